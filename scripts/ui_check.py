"""Drive the Prefect UI in headless Chromium: the deployments are listed, a run started from the form completes,
and its artifacts show. Run with `make ui-check` (installs Debian's chromium and Playwright, no browser download).

What it does, each step a check that stops the script with one message when it fails:
  1. starts a Prefect server on a free port with a temporary PREFECT_HOME and serves prefect.yaml's deployments
     (flows/ui.py), every run writing to a temporary store (SELFPLAY_STORE), never to ./runs;
  2. Deployments page: cycle, cycle-smoke, stage and nightly are listed;
  3. cycle-smoke -> Run -> Custom run: the typed `config` parameter renders as form fields; the run name and
     config.run.name are typed into the form and it is submitted;
  4. the flow run (found by its name) reaches Completed (up to SELFPLAY_UI_CHECK_TIMEOUT_S, default 480 s);
  5. its page shows Completed, its Artifacts tab lists the report (markdown) and metrics (table) artifacts, and the
     markdown report opens;
  6. the nightly deployment shows its cron schedule.
Screenshots go to runs/ui-check/*.png; the last line printed is a JSON summary. Exit 1 on any failed check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.ui import HOST, exit_on_sigterm, local_prefect  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "ui-check"
DEPLOYMENTS = ["cycle", "cycle-smoke", "nightly", "stage"]
RUN_FROM_FORM = "cycle-smoke"
RUN_NAME_PARAM = "ui-check"  # typed into the form as config.run.name; the artifact keys derive from it
ARTIFACTS = {f"{RUN_NAME_PARAM}-cycle-0-report": "markdown", f"{RUN_NAME_PARAM}-cycle-0-report-metrics": "table"}
CHROMIUM = os.environ.get("SELFPLAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_S = float(os.environ.get("SELFPLAY_UI_CHECK_TIMEOUT_S", "480"))


class CheckFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def api_call(api: str, path: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{api}{path}", data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def form_field(page: Page, label: str):
    """The textarea of the schema-form property whose label reads `label` (e.g. 'Name (Optional)')."""
    return page.locator(f"xpath=//span[contains(@class,'schema-form-property__label') and normalize-space()="
                        f"'{label}']/ancestor::div[contains(concat(' ',@class,' '),' p-label ')][1]//textarea")


def check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


def run_check(work: Path) -> dict:
    t0 = time.time()
    store = work / "store"
    port = int(os.environ.get("SELFPLAY_UI_CHECK_PORT") or free_port())
    ui = f"http://{HOST}:{port}"
    shots: list[str] = []
    env = {"PREFECT_HOME": str(work / "home"), "SELFPLAY_STORE": str(store)}
    with open(work / "prefect.log", "w") as log, local_prefect(port, env, log) as (api, served):
        deadline = time.time() + 180
        while time.time() < deadline and len(api_call(api, "/deployments/filter", {})) < len(DEPLOYMENTS):
            check(served.poll() is None, f"the serve process (flows.deployments) exited with {served.returncode}")
            time.sleep(1)
        deps = {d["name"]: d for d in api_call(api, "/deployments/filter", {})}
        check(sorted(deps) == DEPLOYMENTS, f"served deployments are {sorted(deps)}, expected {DEPLOYMENTS}")
        print(f"server {ui}, deployments served after {time.time() - t0:.0f}s", flush=True)

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)

            def shot(name: str, full_page: bool = False) -> None:
                path = OUT / name
                page.screenshot(path=str(path), full_page=full_page)
                shots.append(str(path.relative_to(ROOT)))

            try:
                step = "Deployments page lists the four deployments"
                page.goto(f"{ui}/deployments")
                for name in DEPLOYMENTS:
                    page.get_by_role("link", name=name, exact=True).wait_for()
                page.get_by_text(f"{len(DEPLOYMENTS)} Deployments").wait_for()
                seen = sorted(n for n in DEPLOYMENTS if page.get_by_role("link", name=n, exact=True).count() == 1)
                check(seen == DEPLOYMENTS, f"Deployments page lists {seen}, expected {DEPLOYMENTS}")
                shot("1-deployments.png")

                step = f"{RUN_FROM_FORM}: Run -> Custom run opens the parameter form"
                page.get_by_role("link", name=RUN_FROM_FORM, exact=True).click()
                page.wait_for_url("**/deployments/deployment/*")
                page.get_by_role("button", name="Run", exact=True).click()
                page.get_by_text("Custom run", exact=True).click()
                page.wait_for_url("**/deployments/deployment/*/run**")
                run_name = f"ui-check-{uuid.uuid4().hex[:8]}"
                name_input = page.locator(".flow-run-name-input input")
                name_input.fill(run_name)
                param_name, param_store = form_field(page, "Name (Optional)"), form_field(page, "Store (Optional)")
                param_name.wait_for()
                check(param_name.count() == 1 and param_store.count() == 1,
                      "the form does not render config.run.name and config.run.store as one field each")
                check(param_store.input_value() == str(store),
                      f"the form's config.run.store is {param_store.input_value()!r}, expected {str(store)!r}")
                for label in ("Seed (Optional)", "Num Prompts (Optional)", "Steps (Optional)"):
                    check(page.get_by_text(label, exact=True).count() >= 1, f"the form has no field {label!r}")
                param_name.fill(RUN_NAME_PARAM)
                shot("2-custom-run-form.png")

                step = "submitting the form"
                page.get_by_role("button", name="Submit", exact=True).click()
                runs: list = []
                deadline = time.time() + 60
                while not runs and time.time() < deadline:
                    runs = api_call(api, "/flow_runs/filter", {"flow_runs": {"name": {"any_": [run_name]}}})
                    time.sleep(1)
                check(len(runs) == 1, f"no flow run named {run_name!r} was created by the form")
                run = runs[0]
                run_id = run["id"]
                check(run["deployment_id"] == deps[RUN_FROM_FORM]["id"],
                      f"flow run {run_id} is not of the {RUN_FROM_FORM} deployment")
                run_cfg = run["parameters"]["config"]["run"]
                check(run_cfg["name"] == RUN_NAME_PARAM and run_cfg["store"] == str(store),
                      f"the form's values did not reach the run: config.run = {run_cfg}")
                print(f"flow run {run_name} ({run_id}) started from the form", flush=True)

                step = "waiting for the flow run to complete"
                page.get_by_role("link", name=run_name, exact=True).first.click()
                page.wait_for_url(f"**/runs/flow-run/{run_id}**")
                started, state = time.time(), None
                while time.time() - started < RUN_TIMEOUT_S:
                    state = api_call(api, f"/flow_runs/{run_id}")["state_type"]
                    if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                        break
                    check(served.poll() is None, f"the serve process exited with {served.returncode}")
                    time.sleep(3)
                run = api_call(api, f"/flow_runs/{run_id}")
                check(run["state_type"] not in ("SCHEDULED", "PENDING", "RUNNING"),
                      f"flow run {run_id} still {run['state_name']} after {RUN_TIMEOUT_S:.0f}s "
                      f"(SELFPLAY_UI_CHECK_TIMEOUT_S)")
                check(run["state_type"] == "COMPLETED",
                      f"flow run {run_id} ended {run['state_name']} after {time.time() - started:.0f}s: "
                      f"{(run['state'] or {}).get('message')}")
                print(f"flow run completed, run time {run['total_run_time']:.1f}s", flush=True)

                step = "flow run page shows Completed"
                page.reload()
                page.get_by_text("Completed", exact=True).first.wait_for()
                page.get_by_text(re.compile(r"^\d+ Task runs?$")).first.wait_for()
                page.wait_for_timeout(4000)  # the timeline is a canvas: give it time to draw the finished run
                shot("3-flow-run-completed.png")

                step = "Artifacts tab lists the report and metrics artifacts"
                page.locator("li.p-tab", has_text="Artifacts").click()
                page.wait_for_url("**tab=Artifacts**")
                for key, kind in ARTIFACTS.items():
                    card = page.locator(".artifact-card", has=page.get_by_text(key, exact=True))
                    card.wait_for()
                    shown = card.locator(".artifact-card__subheader").inner_text().strip().lower()
                    check(shown == kind, f"artifact {key} shows as {shown!r}, expected {kind!r}")
                shot("4-flow-run-artifacts.png")
                arts = api_call(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
                keys = {a["key"]: a["type"] for a in arts if a.get("key")}
                check(all(keys.get(k) == t for k, t in ARTIFACTS.items()),
                      f"artifacts of the run are {keys}, expected {ARTIFACTS}")

                step = "the markdown report artifact opens"
                page.get_by_text(f"{RUN_NAME_PARAM}-cycle-0-report", exact=True).click()
                page.wait_for_url("**/artifacts/artifact/**")
                page.get_by_text(f"Self-play cycle 0 of run {RUN_NAME_PARAM}").first.wait_for()
                shot("5-report-artifact.png", full_page=True)

                step = "nightly deployment shows its cron schedule"
                page.goto(f"{ui}/deployments")
                page.get_by_role("link", name="nightly", exact=True).click()
                page.wait_for_url("**/deployments/deployment/*")
                page.get_by_text("flows/cycle.py:nightly_flow", exact=True).wait_for()  # its page, not the list
                page.get_by_text("At 02:00 AM every day", exact=True).wait_for()
                page.wait_for_timeout(1000)
                crons = [s["schedule"].get("cron") for s in deps["nightly"]["schedules"]]
                check(crons == ["0 2 * * *"], f"nightly schedules are {crons}, expected ['0 2 * * *']")
                shot("6-nightly-schedule.png")
                scheduled = api_call(api, "/flow_runs/filter", {
                    "deployments": {"id": {"any_": [deps["nightly"]["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
                if not scheduled:  # reported, not a check: the UI shows the schedule either way
                    print("WARNING: the server's scheduler created no runs for the nightly cron schedule (Prefect "
                          "3.8.8's scheduler fails on SQLAlchemy 2.1: \"Can't evaluate bulk DML statement\"; "
                          "sqlalchemy<2.1 fixes it)", file=sys.stderr, flush=True)
            except (PlaywrightError, CheckFailed) as exc:
                with_shot = OUT / "failed.png"
                try:
                    page.screenshot(path=str(with_shot), full_page=True)
                    shots.append(str(with_shot.relative_to(ROOT)))
                except PlaywrightError:
                    pass
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise CheckFailed(f"{step}: {first}") from None
            finally:
                browser.close()
    return {"ok": True, "deployments": DEPLOYMENTS, "run_from_form": RUN_FROM_FORM, "flow_run": run_id,
            "flow_run_name": run_name, "state": run["state_type"],
            "flow_run_time_s": round(run["total_run_time"], 1), "artifacts": keys, "nightly_cron": crons[0],
            "nightly_scheduled_runs": len(scheduled), "screenshots": shots, "seconds": round(time.time() - t0, 1)}


def main() -> int:
    exit_on_sigterm()
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.png"):
        old.unlink()
    work = Path(tempfile.mkdtemp(prefix="selfplay-ui-check-"))
    try:
        summary = run_check(work)
    except (CheckFailed, TimeoutError, RuntimeError, OSError) as exc:
        print(f"ui-check FAILED: {exc} (server and serve log: {work / 'prefect.log'}; "
              f"screenshots: {OUT.relative_to(ROOT)}/)", file=sys.stderr, flush=True)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
