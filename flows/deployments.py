"""Serve the deployments of prefect.yaml from this process: `python -m flows.deployments` (used by `make ui`).

A deployment with a `config_file` gets a `config` parameter that starts as that recipe, validated by the typed CycleConfig:
the Prefect UI renders it as a form, and a run started there is checked before any work starts.
`SELFPLAY_STORE`, when set, replaces every recipe's `run.store` (scripts/ui_check.py serves into a temporary store).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from prefect import serve
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron

from configs.loader import load_config
from configs.schema import PROJECT_ROOT, CycleConfig


def deployments(path: Path = PROJECT_ROOT / "prefect.yaml") -> list:
    spec = yaml.safe_load(path.read_text())
    out = []
    for d in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(PROJECT_ROOT / d["entrypoint"]))
        params = dict(d.get("parameters") or {})
        if "config_file" in d:
            params["config"] = load_config(PROJECT_ROOT / d["config_file"], CycleConfig).model_dump(mode="json")
        if os.environ.get("SELFPLAY_STORE"):
            if "config" in params:
                params["config"]["run"]["store"] = os.environ["SELFPLAY_STORE"]
            if "store" in params:
                params["store"] = os.environ["SELFPLAY_STORE"]
        schedules = [Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in d.get("schedules") or []]
        out.append(flow.to_deployment(name=d["name"], description=d.get("description"), parameters=params,
                                      schedules=schedules or None))
    return out


if __name__ == "__main__":
    serve(*deployments())
