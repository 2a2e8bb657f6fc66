"""Statistics shared by the benchmark, judge-shift, gate and report stages: per-prompt metric values,
bootstrap intervals, paired parent/child differences. Plain functions over benchmark item rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from configs.schema import BenchmarkConfig
from tasks.stage import stable_seed

# benchmark items: one row per suite prompt of one checkpoint, with its images (benchmark, judge_shift).
# `evaluator` measured them: 'oracle' (the world's, ShapeWorld suite) or 'vlm:<model>' (GenEval-style suite);
# `evaluator_ok` is its verdict per image. `und_true` is understanding on true renders (ShapeWorld), or the model's
# answers agreeing with the evaluator's on the model's own images (no true renders exist for a real suite);
# `und_perturbed` only exists where the world can perturb a scene.
ITEMS = pa.schema([("prompt_id", pa.string()), ("category", pa.string()), ("prompt", pa.string()),
                   ("evaluator", pa.string()), ("evaluator_ok", pa.list_(pa.bool_())),
                   ("self_score", pa.list_(pa.int32())),
                   ("unicycle_soft", pa.float64()), ("unicycle_hard", pa.float64()),
                   ("und_true", pa.float64()), ("und_perturbed", pa.float64()), ("checkpoint_id", pa.string()),
                   ("images", pa.list_(pa.binary()))])


def evaluator_name(rows: list[dict]) -> str:
    """'oracle' or 'vlm': what the metrics of these items are named after."""
    return "vlm" if rows and rows[0]["evaluator"].startswith("vlm:") else "oracle"


def per_prompt(rows: list[dict], threshold: float) -> dict[str, np.ndarray]:
    """Per-prompt values of each metric (means over that prompt's samples), aligned with `rows`."""
    ok = np.array([r["evaluator_ok"] for r in rows], dtype=float)
    score = np.array([r["self_score"] for r in rows], dtype=float)
    rej = score < threshold
    best = np.argmax(np.where(score < 0, -np.inf, score), axis=1)
    ev = evaluator_name(rows)
    understanding = {"und_acc_gt": np.array([r["und_true"] for r in rows]),
                     "und_acc_perturbed": np.array([r["und_perturbed"] for r in rows], dtype=float)}
    if ev == "vlm":
        understanding = {"und_acc_vlm": understanding["und_acc_gt"]}
    return {
        f"gen_acc_{ev}": ok.mean(1),
        "best_of_n_self": ok[np.arange(len(rows)), best],
        f"pass_at_n_{ev}": ok.max(1),
        "non_unification": rej.mean(1),
        f"judge_{ev}_agreement": ((~rej) == ok.astype(bool)).mean(1),
        "unicycle_soft": np.array([r["unicycle_soft"] for r in rows]),
        "unicycle_hard": np.array([r["unicycle_hard"] for r in rows]),
        **understanding,
        # ratio metric: rejected images the oracle also rejects (weights per image, not per prompt)
        "_rejected": rej.sum(1), "_weak": (rej & ~ok.astype(bool)).sum(1),
    }


def bootstrap_ci(values: np.ndarray, reps: int, seed: int, weights: np.ndarray | None = None) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(reps, len(values)))
    if weights is None:
        stats = values[idx].mean(1)
    else:
        w = weights[idx]
        stats = np.where(w.sum(1) > 0, (values[idx]).sum(1) / np.maximum(w.sum(1), 1e-9), np.nan)
    return float(np.nanpercentile(stats, 2.5)), float(np.nanpercentile(stats, 97.5))


def summarize(rows: list[dict], cfg: BenchmarkConfig, suite: str) -> list[dict]:
    out = []
    cats = sorted({r["category"] for r in rows})
    for cat in ["all", *cats]:
        sel = [r for r in rows if cat == "all" or r["category"] == cat]
        v = per_prompt(sel, cfg.threshold)
        for metric, arr in v.items():
            if metric.startswith("_"):
                continue
            lo, hi = bootstrap_ci(arr, cfg.bootstrap, stable_seed(metric, cat))
            out.append({"metric": metric, "category": cat, "value": float(arr.mean()), "ci_low": lo, "ci_high": hi,
                        "n": len(arr)})
        rejected = v["_rejected"].sum()
        if rejected:
            lo, hi = bootstrap_ci(v["_weak"].astype(float), cfg.bootstrap, stable_seed("weak", cat), v["_rejected"])
            out.append({"metric": "weak_generation_share", "category": cat, "value": float(v["_weak"].sum() / rejected),
                        "ci_low": lo, "ci_high": hi, "n": int(rejected)})
    ckpt = rows[0]["checkpoint_id"] if rows else ""
    return [{"suite": suite, "checkpoint_id": ckpt, **r} for r in out]


def paired_delta(parent: list[dict], child: list[dict], metric: str, cfg: BenchmarkConfig) -> dict:
    """Child minus parent on the same prompts and seeds, with a paired bootstrap 95 % interval."""
    by = {r["prompt_id"]: r for r in child}
    pairs = [(r, by[r["prompt_id"]]) for r in parent if r["prompt_id"] in by]
    a = per_prompt([p for p, _ in pairs], cfg.threshold)[metric]
    b = per_prompt([c for _, c in pairs], cfg.threshold)[metric]
    lo, hi = bootstrap_ci(b - a, cfg.bootstrap, stable_seed("delta", metric))
    return {"metric": metric, "delta": float((b - a).mean()), "ci_low": lo, "ci_high": hi, "n": len(pairs)}


def headline(metric_rows: list[dict]) -> dict[str, float]:
    """The overall value of each metric: what reports and the promotion gate read."""
    return {r["metric"]: round(r["value"], 4) for r in metric_rows if r["category"] == "all"}
