"""`make ui`: a local Prefect server on 127.0.0.1 with the project's deployments served beside it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

HOST, PORT = "127.0.0.1", int(os.environ.get("SELFPLAY_UI_PORT", "4200"))


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {url} not healthy after {timeout_s}s")


def main() -> None:
    api = f"http://{HOST}:{PORT}/api"
    env = dict(os.environ, PREFECT_API_URL=api, PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(PORT),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_API_URL=api)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                               "--port", str(PORT)], env=env)
    try:
        wait_healthy(api)
        print(f"Prefect UI: http://{HOST}:{PORT}  (serving deployments; Ctrl-C stops both)", flush=True)
        subprocess.run([sys.executable, "-m", "flows.deployments"], env=env, check=False)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
