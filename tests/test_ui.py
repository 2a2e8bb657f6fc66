"""The Prefect UI end to end in headless Chromium (scripts/ui_check.py): deployments listed, a cycle-smoke run
started from the custom-run form completes, its artifacts show, screenshots under runs/ui-check/.

Skipped where Debian's chromium or Playwright is missing (the default CI installs neither; `make ui-check` does).
Takes about 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("SELFPLAY_CHROMIUM") or shutil.which("chromium")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium, or make ui-check)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="no playwright (pip install playwright==1.65.2, or make ui-check)"),
]


def test_ui_check_end_to_end():
    proc = subprocess.run([sys.executable, "scripts/ui_check.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:] or proc.stdout[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["deployments"] == ["cycle", "cycle-smoke", "nightly", "stage"]
    assert summary["state"] == "COMPLETED"
    assert set(summary["artifacts"].values()) == {"markdown", "table"}
    assert summary["nightly_cron"] == "0 2 * * *"
    assert all((ROOT / p).stat().st_size > 0 for p in summary["screenshots"]) and len(summary["screenshots"]) == 6
