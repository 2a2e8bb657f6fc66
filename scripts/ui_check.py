"""Drive the Prefect UI in headless Chromium: the deployments are listed, a run started from the form completes,
and its artifacts show. Screenshots go to runs/ui/. Run with `make ui-check` (installs Chromium and Playwright).

The browser is Debian's /usr/bin/chromium driven by Playwright (no browser download).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from flows.ui import wait_healthy

HOST, PORT = "127.0.0.1", int(os.environ.get("SELFPLAY_UI_CHECK_PORT", "4311"))
UI, API = f"http://{HOST}:{PORT}", f"http://{HOST}:{PORT}/api"
OUT = Path("runs/ui")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def api(path: str, body: dict | None = None) -> dict | list:
    req = urllib.request.Request(f"{API}{path}", data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_API_URL=API, PREFECT_UI_API_URL=API, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_HOME=str(Path(".prefect-ui-check").resolve()))
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port",
                               str(PORT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    served = None
    try:
        wait_healthy(API)
        served = subprocess.Popen([sys.executable, "-m", "flows.deployments"], env=env)
        deadline = time.time() + 120
        while time.time() < deadline and len(api("/deployments/filter")) < 4:
            time.sleep(1)
        names = sorted(d["name"] for d in api("/deployments/filter"))
        print("deployments:", names, flush=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{UI}/deployments")
            page.get_by_text("cycle-smoke").first.wait_for(timeout=60_000)
            page.screenshot(path=str(OUT / "1-deployments.png"), full_page=True)
            page.get_by_text("cycle-smoke").first.click()
            page.get_by_role("button", name="Run").first.click()
            page.get_by_text("Custom run").first.click()
            page.wait_for_url("**/run**", timeout=60_000)
            page.get_by_text("Parameters").first.wait_for(timeout=60_000)
            page.screenshot(path=str(OUT / "2-run-form.png"), full_page=True)
            page.get_by_role("button", name="Submit").first.click()
            page.wait_for_url("**/flow-run/**", timeout=60_000)
            run_id = page.url.rstrip("/").split("/")[-1]
            print("flow run started from the form:", run_id, flush=True)
            state, deadline = None, time.time() + 900
            while time.time() < deadline:
                with urllib.request.urlopen(f"{API}/flow_runs/{run_id}", timeout=30) as r:
                    state = json.loads(r.read())["state_type"]
                if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                time.sleep(3)
            print("flow run state:", state, flush=True)
            page.goto(f"{UI}/runs/flow-run/{run_id}?tab=Artifacts")
            page.get_by_text("report").first.wait_for(timeout=60_000)
            page.screenshot(path=str(OUT / "3-run-artifacts.png"), full_page=True)
            arts = api("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
            browser.close()
        kinds = sorted({a["type"] for a in arts})
        print(json.dumps({"deployments": names, "flow_run": run_id, "state": state, "artifact_types": kinds,
                          "screenshots": sorted(str(p) for p in OUT.glob("*.png"))}))
        return 0 if state == "COMPLETED" and {"markdown", "table"} <= set(kinds) else 1
    finally:
        for proc in (served, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
