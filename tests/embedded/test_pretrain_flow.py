"""`selfplay pretrain` really runs: the Prefect flow trains a tiny model from scratch and writes a checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest

from configs.loader import ConfigError, load_config
from model.embedded.train import PretrainConfig, lr_at

ROOT = Path(__file__).resolve().parents[2]


def test_recipes_validate():
    for name in ("base", "cpu", "tiny", "gpu_v2"):
        cfg = load_config(ROOT / "configs" / "pretrain" / f"{name}.yaml", PretrainConfig)
        assert cfg.model.transformer.d_model > 0
    with pytest.raises(ConfigError):
        load_config(ROOT / "configs" / "pretrain" / "tiny.yaml", PretrainConfig, ["optim.stepz=3"])


def test_lr_schedule():
    o = PretrainConfig().optim
    lrs = [lr_at(s, o) for s in range(o.steps)]
    assert lrs[0] < lrs[o.warmup] and abs(max(lrs) - o.lr) < 1e-9 and lrs[-1] < 0.1 * o.lr
    assert lr_at(o.warmup + 1, o, time_frac=1.0) == pytest.approx(o.min_lr)


def test_pretrain_flow_tiny(prefect_api, tmp_path):
    from flows.pretrain import pretrain_flow
    from model.embedded import EmbeddedUMM
    out = tmp_path / "ckpt"
    metrics = pretrain_flow(config=str(ROOT / "configs" / "pretrain" / "tiny.yaml"),
                            overrides=["optim.steps=8", "self_data.every=4", "self_data.start=2",
                                       "self_data.images=8", "self_data.min_fill=4", "self_data.buffer=64"],
                            out_dir=str(out), progress=False)
    for f in ("model.safetensors", "config.json", "recipe.yaml", "metrics.json", "curve.json", "curve.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["training"]["steps_run"] == 8 and saved["training"]["self_images"] >= 8
    for k in ("und_acc_gt", "gen_acc_oracle", "non_unification", "judge_oracle_agreement"):
        assert 0.0 <= metrics[k] <= 1.0
    curve = json.loads((out / "curve.json").read_text())["curve"]
    assert [c["step"] for c in curve] == [2, 4, 6, 8] and all(np.isfinite(c["loss"]) for c in curve)
    assert curve[-1]["loss"] < curve[0]["loss"]  # it learns, even in 8 steps
    m = EmbeddedUMM.from_pretrained(out)
    assert m.model_id == metrics["checkpoint_id"]
    assert m.generate(["a red circle"], [0], [3.0])[0].size == (32, 32)
