"""`make ui`: a local Prefect server on 127.0.0.1 with the project's deployments served beside it.

`local_prefect()` is the same set-up as a context manager (scripts/ui_check.py uses it with its own port, a temporary
PREFECT_HOME and a temporary store); it always stops the serve process and the server, with their children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import IO

HOST, PORT = "127.0.0.1", int(os.environ.get("SELFPLAY_UI_PORT", "4200"))


def wait_healthy(url: str, timeout_s: float = 120, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"Prefect server exited with code {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {url} not healthy after {timeout_s}s")


def prefect_env(port: int, **extra: str) -> dict[str, str]:
    api = f"http://{HOST}:{port}/api"
    return dict(os.environ, PREFECT_API_URL=api, PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(port),
                PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_API_URL=api, **extra)


def _stop(proc: subprocess.Popen | None, sig: int, grace_s: float) -> None:
    """Signal the process group we started (the process and its children), then kill what is left."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, signal.SIGKILL)  # children (uvicorn, flow-run subprocesses) may outlive the leader
    proc.wait(timeout=30)


@contextlib.contextmanager
def local_prefect(port: int = PORT, extra_env: dict[str, str] | None = None,
                  log: IO | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the server, wait until healthy, serve prefect.yaml's deployments; yield (api url, serve process)."""
    env = prefect_env(port, **(extra_env or {}))
    api = env["PREFECT_API_URL"]
    out = dict(stdout=log, stderr=subprocess.STDOUT) if log is not None else {}
    # own sessions (stopped as groups), with Ctrl-C's default action even when started from a background job
    out.update(start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    server = served = None
    try:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                                   "--port", str(port)], env=env, **out)
        wait_healthy(api, proc=server)
        served = subprocess.Popen([sys.executable, "-m", "flows.deployments"], env=env, **out)
        yield api, served
    finally:
        _stop(served, signal.SIGINT, 20)  # like Ctrl-C: the runner stops its flow runs
        _stop(server, signal.SIGTERM, 20)


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so `local_prefect` still stops the server and the serve process."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def main() -> None:
    exit_on_sigterm()
    with local_prefect(PORT) as (api, served):
        print(f"Prefect UI: http://{HOST}:{PORT}  (serving deployments; Ctrl-C stops both)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            served.wait()


if __name__ == "__main__":
    main()
