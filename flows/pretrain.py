"""`selfplay pretrain`: pretraining of the embedded model from scratch on the world, as a Prefect flow.

The flow only wires: load the typed recipe, run the training loop (model.embedded.train.pretrain, plain
Python, also runnable without Prefect as `python -m model.embedded.train`), and publish the metrics as a
Prefect artifact. Progress bars (tqdm) go to the terminal; the curve is saved as curve.png + curve.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from configs.loader import load_config
from model.embedded.train import PretrainConfig, pretrain


@task(name="pretrain-embedded", cache_policy=NONE)
def _train(cfg_json: dict, out_dir: str, progress: bool) -> dict:
    cfg = PretrainConfig.model_validate(cfg_json)
    return pretrain(cfg, out_dir, progress=progress)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config: str | None = None, overrides: list[str] | None = None, out_dir: str = "runs/pretrain",
                  progress: bool = True) -> dict:
    """Train tokenizer + model from scratch; returns the final metrics (also in <out_dir>/metrics.json)."""
    cfg = load_config(config, PretrainConfig, overrides or [])
    metrics = _train(cfg.model_dump(mode="json"), out_dir, progress)
    try:
        from prefect.artifacts import create_markdown_artifact
        keys = ("und_acc_gt", "gen_acc_oracle", "non_unification", "judge_oracle_agreement",
                "weak_generation_share", "checkpoint_id")
        rows = "\n".join(f"| {k} | {metrics.get(k)} |" for k in keys)
        create_markdown_artifact(key="pretrain-metrics", markdown=f"| metric | value |\n|---|---|\n{rows}\n",
                                 description=f"embedded pretraining -> {Path(out_dir).resolve()}")
    except Exception:  # artifacts are a convenience; never fail the run on them
        pass
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("snapshots", "gen_acc_oracle_per_category")}))
    return metrics
