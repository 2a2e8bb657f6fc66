"""report: the promotion gate and the per-cycle report (markdown + PNG plots + image grids).

The gate promotes the child only if generation improves (paired difference on the same suite prompts and
seeds) and understanding does not fall by more than the tolerance; otherwise the parent stays promoted, and
the report says why.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from configs.schema import BenchmarkConfig, GateConfig  # noqa: E402
from storage import DatasetRef, from_png  # noqa: E402
from tasks.benchmark import headline, paired_delta  # noqa: E402
from tasks.common import read  # noqa: E402

# the judge on the parent's images (a child's own images differ from its parent's: this holds them fixed)
JUDGE_FIXED = "judge_agreement_on_parent_images"
TABLE_METRICS = ("gen_acc_oracle", "best_of_n_self", "pass_at_n_oracle", "und_acc_gt", "und_acc_perturbed",
                 "non_unification", "weak_generation_share", "judge_oracle_agreement", JUDGE_FIXED,
                 "unicycle_soft", "unicycle_hard")


def gate(parent_items: list[dict], child_items: list[dict], parent: dict, child: dict, cfg: GateConfig,
         bcfg: BenchmarkConfig) -> tuple[bool, str, dict]:
    d_gen = paired_delta(parent_items, child_items, cfg.metric, bcfg)
    d_und = paired_delta(parent_items, child_items, cfg.understanding_metric, bcfg)
    reasons = []
    if not d_gen["delta"] > cfg.min_gain:
        reasons.append(f"{cfg.metric} changed by {d_gen['delta']:+.4f} (needs > {cfg.min_gain:+.4f})")
    if cfg.require_significant and not d_gen["ci_low"] > 0:
        reasons.append(f"{cfg.metric} gain not significant (95 % CI [{d_gen['ci_low']:+.4f}, {d_gen['ci_high']:+.4f}])")
    if d_und["delta"] < -cfg.max_understanding_drop:
        reasons.append(f"{cfg.understanding_metric} fell by {-d_und['delta']:.4f} (tolerance {cfg.max_understanding_drop})")
    ok = not reasons
    why = ("promoted: " if ok else "not promoted: ") + ("; ".join(reasons) if reasons else
                                                         f"{cfg.metric} {d_gen['delta']:+.4f}, "
                                                         f"{cfg.understanding_metric} {d_und['delta']:+.4f}")
    return ok, why, {"gen": d_gen, "und": d_und}


def comparison_rows(parent: dict, child: dict) -> list[dict]:
    return [{"metric": m, "parent": parent.get(m), "child": child.get(m),
             "delta": None if parent.get(m) is None or child.get(m) is None else round(child[m] - parent[m], 4)}
            for m in TABLE_METRICS]


def _per_category(ref: DatasetRef, metric: str) -> dict[str, float]:
    return {r["category"]: r["value"] for r in read(ref).to_pylist() if r["metric"] == metric and r["category"] != "all"}


def plot_categories(parent_ref: DatasetRef, child_ref: DatasetRef, path: Path, metric: str = "gen_acc_oracle") -> None:
    a, b = _per_category(parent_ref, metric), _per_category(child_ref, metric)
    cats = sorted(a)
    x = np.arange(len(cats))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(x - 0.2, [a[c] for c in cats], 0.4, label="parent")
    ax.bar(x + 0.2, [b.get(c, 0) for c in cats], 0.4, label="child")
    ax.set_xticks(x, cats, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_history(history: list[dict], path: Path) -> None:
    """Metrics across cycles (history rows: cycle, and metric values of the checkpoint after that cycle)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in ("gen_acc_oracle", "und_acc_gt", "judge_oracle_agreement", JUDGE_FIXED, "unicycle_soft"):
        ys = [h.get(m) for h in history]
        if any(y is not None for y in ys):
            ax.plot([h["cycle"] for h in history], ys, marker="o", label=m)
    ax.set_xlabel("cycle")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_grid(refs: dict[str, DatasetRef], path: Path, n_prompts: int = 8, scale: int = 3) -> None:
    """For a few prompts: the best and worst of its samples with their own-judge scores."""
    prompts = {r["prompt_id"]: r["prompt"] for r in read(refs["prompts"], ["prompt_id", "prompt"]).to_pylist()}
    sel = read(refs["selections"]).to_pylist()
    sel = [s for s in sel if s["best_sample_idx"] is not None][:n_prompts]
    wanted = {(s["prompt_id"], s["best_sample_idx"]) for s in sel} | {(s["prompt_id"], s["worst_sample_idx"]) for s in sel}
    images = {(r["prompt_id"], r["sample_idx"]): r["image"]
              for r in read(refs["rollouts"], ["prompt_id", "sample_idx", "image"]).to_pylist()
              if (r["prompt_id"], r["sample_idx"]) in wanted}
    cell = 32 * scale
    canvas = Image.new("RGB", (2 * cell + 420, max(1, len(sel)) * (cell + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, s in enumerate(sel):
        y = row * (cell + 8)
        for col, key in enumerate(("best_sample_idx", "worst_sample_idx")):
            img = from_png(images[(s["prompt_id"], s[key])]).resize((cell, cell), Image.NEAREST)
            canvas.paste(img, (col * cell, y))
        draw.text((2 * cell + 8, y + 4), prompts[s["prompt_id"]][:60], fill="black")
        draw.text((2 * cell + 8, y + 24), f"best {s['max_score']}  worst {s['min_score']}  "
                                          f"{'accepted' if s['accepted'] else 'rejected'}", fill="gray")
    canvas.save(path)


def markdown(run: str, cycle: int, rows: list[dict], why: str, deltas: dict, files: dict[str, str],
             flags: list[str]) -> str:
    lines = [f"# Self-play cycle {cycle} of run `{run}`", "", f"**{why}**", ""]
    lines += [f"> {f}" for f in flags] + ([""] if flags else [])
    lines += ["| metric | parent | child | delta |", "|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    lines += [f"| {r['metric']} | {fmt(r['parent'])} | {fmt(r['child'])} | {fmt(r['delta'])} |" for r in rows]
    g = deltas["gen"]
    lines += ["", f"Paired difference of `{g['metric']}` on {g['n']} held-out prompts: {g['delta']:+.4f} "
                  f"(95 % bootstrap CI [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}])."]
    if "judge" in deltas:
        j = deltas["judge"]
        lines += ["", f"The judge alone (child's judge vs parent's, both on the parent's images): agreement with "
                      f"the oracle {j['delta']:+.4f} (95 % CI [{j['ci_low']:+.4f}, {j['ci_high']:+.4f}])."]
    lines += [""]
    lines += [f"![{name}]({fname})" for name, fname in files.items()]
    return "\n".join(lines) + "\n"


def headline_of(ref: DatasetRef) -> dict[str, float]:
    return headline(read(ref).to_pylist())

