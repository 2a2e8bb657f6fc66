"""report: the per-cycle report (markdown + PNG plots + image grid) and the cycle's summary.

Its one-row `report` dataset holds the summary (JSON: parent and child metrics, the gate's decision and
deltas, post-training and generation-side figures), the markdown with its plots inlined (the Prefect UI
cannot reach files beside the datasets), and the parent-versus-child table; report.md and the PNGs are also
written into the dataset's folder.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402

import pyarrow as pa  # noqa: E402

from model.judges import is_teacher  # noqa: E402
from storage import Dataset, DatasetRef, Registry, Store, from_png  # noqa: E402
from tasks.stage import StageContext, StageSpec, build_plan, make_plan, part_stats, read, read_row  # noqa: E402

# the judge on the parent's images (the gate's name for it)
JUDGE_FIXED = "judge_agreement_on_parent_images"
REPORT = pa.schema([("summary", pa.string()), ("markdown", pa.string()), ("table", pa.string())])
STAGE = StageSpec(name="report", code_version="2", section=None,
                  inputs=("gate", "checkpoint", "prompts", "rollouts", "judgements", "selections",
                          "parent_benchmark", "child_benchmark"),
                  outputs={"report": REPORT}, model=False, artifact="report")
# the ShapeWorld suite's metrics are measured by the world's oracle, the real-model suite's by an external VLM
TABLE_METRICS = ("gen_acc_oracle", "gen_acc_vlm", "best_of_n_self", "pass_at_n_oracle", "pass_at_n_vlm",
                 "und_acc_gt", "und_acc_perturbed", "und_acc_vlm", "non_unification", "weak_generation_share",
                 "judge_oracle_agreement", "judge_vlm_agreement", JUDGE_FIXED, "unicycle_soft", "unicycle_hard")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def comparison_rows(parent: dict, child: dict) -> list[dict]:
    return [{"metric": m, "parent": parent.get(m), "child": child.get(m),
             "delta": None if parent.get(m) is None or child.get(m) is None else round(child[m] - parent[m], 4)}
            for m in TABLE_METRICS if m in parent or m in child]


def _per_category(ref: DatasetRef, metric: str) -> dict[str, float]:
    return {r["category"]: r["value"] for r in read(ref).to_pylist() if r["metric"] == metric and r["category"] != "all"}


def plot_categories(parent_ref: DatasetRef, child_ref: DatasetRef) -> bytes:
    metric = "gen_acc_oracle"
    a = _per_category(parent_ref, metric)
    if not a:  # the real-model suite's evaluator is a VLM
        metric = "gen_acc_vlm"
        a = _per_category(parent_ref, metric)
    b = _per_category(child_ref, metric)
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
    return _png(fig)


def plot_history(history: list[dict]) -> bytes:
    """Metrics across cycles (history rows: cycle, and metric values of the checkpoint after that cycle)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in ("gen_acc_oracle", "gen_acc_vlm", "und_acc_gt", "und_acc_vlm", "judge_oracle_agreement",
              "judge_vlm_agreement", JUDGE_FIXED, "unicycle_soft"):
        ys = [h.get(m) for h in history]
        if any(y is not None for y in ys):
            ax.plot([h["cycle"] for h in history], ys, marker="o", label=m)
    ax.set_xlabel("cycle")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def image_grid(refs: dict[str, DatasetRef], n_prompts: int = 8, scale: int = 3) -> bytes:
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
    buf = io.BytesIO()
    canvas.save(buf, format="png")
    return buf.getvalue()


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
        by = "the oracle" if "oracle" in j["metric"] else "the external VLM"
        lines += ["", f"The judge alone (child's judge vs parent's, both on the parent's images): agreement with "
                      f"{by} {j['delta']:+.4f} (95 % CI [{j['ci_low']:+.4f}, {j['ci_high']:+.4f}])."]
    lines += [""]
    lines += [f"![{name}]({fname})" for name, fname in files.items()]
    return "\n".join(lines) + "\n"





PLOTS = {"per_category.png": "per-category generation accuracy", "history.png": "metrics across cycles",
         "best_worst.png": "best and worst of N (own judge)"}


def summary(inputs: dict[str, DatasetRef], ctx: StageContext) -> dict:
    """The cycle in one JSON object: what the CLI prints and the flows return."""
    gate = read_row(inputs["gate"], ("parent_metrics", "child_metrics", "deltas"))
    trained = read_row(inputs["checkpoint"], ("metrics",))
    judges = sorted(set(read(inputs["judgements"], ["judge_id"]).column("judge_id").to_pylist()))
    return {"parent": {"checkpoint_id": gate["parent"], **gate["parent_metrics"]},
            "child": {"checkpoint_id": gate["child"], **gate["child_metrics"]},
            "promoted": gate["passed"], "reason": gate["reason"], "run": ctx.run, "cycle": ctx.cycle,
            "delta_gen_acc_oracle": gate["deltas"]["gen"], "delta_judge_on_parent_images": gate["deltas"]["judge"],
            "posttrain": {k: trained["metrics"].get(k) for k in ("train_s", "tokens_per_s", "heldout_before",
                                                                 "heldout_after", "world_size", "train_examples")},
            "generation": {"propose": part_stats(inputs["prompts"]), "judge": part_stats(inputs["judgements"])},
            "selected_by": judges, "self_play": not any(is_teacher(j) for j in judges)}


def teacher_flags(s: dict) -> list[str]:
    """The label a teacher-judged cycle carries wherever its report is read."""
    if s["self_play"]:
        return []
    return [f"**Teacher-judged, not self-play:** training data was selected by {', '.join(s['selected_by'])}, an "
            "external judge; gains here are not the model's own."]


def _inline(md: str, pngs: dict[str, bytes]) -> str:
    for name, data in pngs.items():
        md = md.replace(f"]({name})", f"](data:image/png;base64,{base64.b64encode(data).decode()})")
    return md


def run(inputs: dict[str, DatasetRef], cfg: None, ctx: StageContext, refresh: bool = False) -> dict[str, DatasetRef]:
    p = make_plan(STAGE, inputs, {}, ctx)
    folder = Dataset(p.ref).dir

    def table(_: int) -> pa.Table:
        s = summary(inputs, ctx)
        s["report"] = f"{folder}/report.md"
        lineage = Registry(ctx.store, ctx.registry_line).lineage(s["child"]["checkpoint_id"])
        history = [{"cycle": m.cycle, **m.metrics.get("benchmark", {})} for m in lineage][::-1]
        pngs = {"per_category.png": plot_categories(inputs["parent_benchmark"], inputs["child_benchmark"]),
                "history.png": plot_history(history), "best_worst.png": image_grid(inputs)}
        rows = comparison_rows(s["parent"], s["child"])
        md = markdown(ctx.run, ctx.cycle, rows, s["reason"], {"gen": s["delta_gen_acc_oracle"],
                                                              "judge": s["delta_judge_on_parent_images"]},
                      {v: k for k, v in PLOTS.items()}, flags=teacher_flags(s))
        store = Store(ctx.store)
        for name, data in {**pngs, "report.md": md.encode()}.items():
            store.atomic_write(f"{folder}/{name}", data)
        return pa.Table.from_pylist([{"summary": json.dumps(s), "markdown": _inline(md, pngs),
                                      "table": json.dumps(rows)}], schema=REPORT)

    return {"report": build_plan(p, table, ctx, refresh)}


def summary_of(ref: DatasetRef) -> dict:
    return read_row(ref, ("summary",))["summary"]
