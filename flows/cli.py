"""`selfplay`: the command line. Commands parse arguments and hand over to flows and stages; no logic lives here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

# fresh SQLite databases log 'database is locked' with the server's analytics on
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# OpenMP spin-waiting collapses torch's 2-thread decoding whenever another process is busy (set before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    help="Self-play post-training for unified multimodal models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks that print JSON as their last line.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and validate configs.", no_args_is_help=True)
ckpt_app = typer.Typer(help="The checkpoint registry: list and promote.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(config_app, name="config")
app.add_typer(ckpt_app, name="checkpoints")

ConfigPath = Annotated[Path, typer.Argument(help="YAML recipe, e.g. configs/cycle/tiny.yaml")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides")]


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def call_flow(fn, cfg, *args, runs_stages: bool = True, **kwargs):
    """A flow, with what is wrong before any work (a DAG, an unreachable scheduler) said in one message. A flow
    that runs its DAG's stages itself gets the task runner `run.cluster` asks for, so its run shows them."""
    from flows.cluster import ClusterError, task_runner
    from flows.dags import DagError

    try:
        runner = task_runner(cfg)  # an unreachable scheduler stops here
        return (fn.with_options(task_runner=runner) if runs_stages else fn)(cfg, *args, **kwargs)
    except (ClusterError, DagError) as exc:
        fail(str(exc))


def load_cycle_config(path: Path, overrides: list[str] | None):
    from configs.loader import ConfigError, load_config
    from configs.schema import CycleConfig

    try:
        return load_config(path, CycleConfig, overrides or [])
    except ConfigError as exc:
        fail(str(exc))


@config_app.command("show")
def config_show(config: ConfigPath, overrides: Overrides = None) -> None:
    """Validate a cycle config with overrides and print it resolved, as YAML."""
    import yaml

    cfg = load_cycle_config(config, overrides)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@ckpt_app.command("list")
def checkpoints_list(store: str = "./runs", line: str = "default") -> None:
    """List registered checkpoints with their parent, cycle and metrics (JSON lines)."""
    from storage import Registry

    reg = Registry(store, line)
    promoted = reg.promoted()
    for m in reg.list():
        row = m.model_dump(include={"checkpoint_id", "parent", "cycle", "data_fingerprint", "metrics"})
        row["promoted"] = promoted is not None and promoted.checkpoint_id == m.checkpoint_id
        typer.echo(json.dumps(row))


@ckpt_app.command("promote")
def checkpoints_promote(checkpoint_id: str, store: str = "./runs", line: str = "default") -> None:
    """Point the line's 'promoted' pointer at a registered checkpoint (atomic switch)."""
    from storage import Registry, RegistryError

    try:
        Registry(store, line).promote(checkpoint_id)
    except (RegistryError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"promoted {checkpoint_id}")


def _print_cycle(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from tasks.report import comparison_rows

    table = Table(title=f"run {summary['run']} cycle {summary['cycle']}: parent vs child (held-out suite)")
    for col in ("metric", "parent", "child", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    for r in comparison_rows(summary["parent"], summary["child"]):
        table.add_row(r["metric"], fmt(r["parent"]), fmt(r["child"]), fmt(r["delta"]))
    console = Console(stderr=True)
    console.print(table)
    console.print(summary["reason"])
    j = summary.get("delta_judge_on_parent_images")
    if j:
        console.print(f"the judge alone, on the parent's images: {j['delta']:+.4f} "
                      f"(95 % CI [{j['ci_low']:+.4f}, {j['ci_high']:+.4f}])")
    console.print(f"report: {summary['report']}")


@app.command("run")
def run(config: ConfigPath, overrides: Overrides = None) -> None:
    """One full self-play cycle: propose -> rollout -> judge -> select -> reconstruct -> posttrain -> benchmark -> gate."""
    cfg = load_cycle_config(config, overrides)
    from flows.cycle import cycle_flow

    summary = call_flow(cycle_flow, cfg)
    _print_cycle(summary)
    keep = ("gen_acc_oracle", "und_acc_gt", "non_unification", "unicycle_soft", "unicycle_hard",
            "judge_oracle_agreement", "judge_agreement_on_parent_images", "best_of_n_self", "checkpoint_id")
    typer.echo(json.dumps({"parent": {k: summary["parent"].get(k) for k in keep},
                           "child": {k: summary["child"].get(k) for k in keep},
                           "promoted": summary["promoted"], "run": summary["run"]}))


@app.command("nightly")
def nightly(config: ConfigPath, overrides: Overrides = None,
            cycles: Annotated[int, typer.Option(min=1, help="cycles to run")] = 3) -> None:
    """N cycles, each from the promoted checkpoint and the previous discard pool (JSON per cycle)."""
    cfg = load_cycle_config(config, overrides)
    from flows.cycle import nightly_flow

    results = call_flow(nightly_flow, cfg, cycles, runs_stages=False)  # each cycle is a flow run of its own
    for summary in results:
        _print_cycle(summary)
    typer.echo(json.dumps([{"cycle": s["cycle"], "promoted": s["promoted"], "parent": s["parent"],
                            "child": s["child"]} for s in results]))


ablate_app = typer.Typer(help="Ablations on the embedded model.", no_args_is_help=True)
app.add_typer(ablate_app, name="ablate")


@ablate_app.command("cpr")
def ablate_cpr(config: Annotated[Path, typer.Argument(help="cycle recipe")] = Path("configs/cycle/tiny.yaml"),
               overrides: Overrides = None,
               cpr_mixture: Annotated[Optional[list[str]], typer.Option(
                   help="KIND=WEIGHT over UniCorn's 5:5:3:1 for the cpr arm (repeatable), e.g. reflection=0")] = None
               ) -> None:
    """Generation-only SFT vs the CPR mixture vs DPO on the same self-generated data (JSON last line)."""
    cfg = load_cycle_config(config, overrides)
    from pydantic import ValidationError

    from configs.schema import ReconstructConfig
    from flows.ablate import FULL_MIXTURE, ablate_cpr_flow

    mixture = dict(FULL_MIXTURE)
    for item in cpr_mixture or []:
        kind, sep, weight = item.partition("=")
        if not sep:
            fail(f"--cpr-mixture {item!r}: expected KIND=WEIGHT")
        try:
            mixture[kind.strip()] = float(weight)
        except ValueError:
            fail(f"--cpr-mixture {item!r}: {weight!r} is not a number")
    try:
        ReconstructConfig(mixture=mixture)
    except ValidationError as exc:
        fail(f"--cpr-mixture: {exc.errors()[0]['msg']} (got {mixture})")
    typer.echo(json.dumps(call_flow(ablate_cpr_flow, cfg, mixture)))


@app.command("generate")
def generate(config: ConfigPath, overrides: Overrides = None,
             refresh: Annotated[Optional[list[str]], typer.Option(help="stage to recompute (repeatable)")] = None
             ) -> None:
    """The generation side of a cycle: propose -> rollout -> judge -> select, cached by fingerprint."""
    cfg = load_cycle_config(config, overrides)
    from flows.cycle import generate_flow

    summary = call_flow(generate_flow, cfg, refresh=refresh or [])
    typer.echo(json.dumps(summary))


@app.command("stage")
def stage(name: Annotated[str, typer.Argument(help="a stage (propose, rollout, judge, select, reconstruct, posttrain, "
                                                   "benchmark, judge_shift, gate, report, suite) or a node id")],
          run: Annotated[str, typer.Option(help="a recorded run's name")],
          overrides: Overrides = None, store: str = "./runs",
          cycle: Annotated[Optional[int], typer.Option(help="the recorded cycle (default: the latest)")] = None,
          only: Annotated[bool, typer.Option(help="rerun only this stage, not the stages that depend on it")] = False,
          refresh: Annotated[bool, typer.Option(help="recompute even if cached")] = False) -> None:
    """Rerun one stage of a recorded cycle with its recorded inputs and checkpoint (and what depends on it)."""
    from configs.loader import ConfigError
    from flows.cycle import stage_flow
    from flows.dags import DagError
    from storage import RunRecordError, validate_name

    try:
        validate_name(run, "run name")
        typer.echo(json.dumps(stage_flow(name, run, cycle, overrides or [], store, only, refresh)))
    except (ConfigError, RunRecordError, DagError, ValueError) as exc:
        fail(str(exc))


@bench_app.command("storage")
def bench_storage(rows: int = 20_000, parts: int = 20) -> None:
    """Write, verify and read an image dataset through the artifact store."""
    from storage.bench import bench_storage as run

    typer.echo(json.dumps(run(rows=rows, parts=parts)))


@bench_app.command("stages")
def bench_stages(prompts: int = 300, samples: int = 8) -> None:
    """propose, rollout, judge and select timed on the embedded model (prompts x samples images)."""
    from flows.bench import bench_stages as run

    typer.echo(json.dumps(run(prompts=prompts, samples=samples)))


@bench_app.command("scale")
def bench_scale(config: Annotated[Path, typer.Argument(help="cycle recipe")] = Path("configs/cycle/tiny.yaml"),
                overrides: Overrides = None, prompts: int = 64,
                workers: Annotated[Optional[list[int]], typer.Option(help="Dask worker counts (repeatable)")] = None,
                local: Annotated[bool, typer.Option(help="also run in-process, as run.cluster=local")] = True,
                judge: Annotated[bool, typer.Option(help="judge the images too")] = True) -> None:
    """rollout + judge throughput in-process and on Dask workers (1 and N), datasets compared, JSON last line."""
    from flows.bench import bench_scale as run

    load_cycle_config(config, overrides)  # a bad recipe stops here, before any cluster starts
    typer.echo(json.dumps(run(str(config), list(overrides or []), prompts, tuple(workers or [1, 2]), local,
                              judge)))


@app.command("pretrain")
def pretrain(
    config: Annotated[Optional[str], typer.Argument(help="recipe YAML (configs/pretrain/*.yaml); defaults if omitted")] = None,
    overrides: Overrides = None,
    out: Annotated[str, typer.Option(help="checkpoint directory to write")] = "runs/pretrain",
    progress: bool = True,
) -> None:
    """Pretrain the embedded model from scratch on the world (a Prefect flow); prints the metrics JSON last."""
    from flows.pretrain import pretrain_flow

    metrics = pretrain_flow(config=config, overrides=list(overrides or []), out_dir=out, progress=progress)
    typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "snapshots"}))


# --- each registered backend adds its own commands (the embedded model: `world`, `model`) ---
from model import registry as _registry  # noqa: E402

for _backend in _registry.all_backends():
    if _backend.cli is not None:
        _backend.cli(app)
# --- end of registrations ---


@bench_app.command("rollout", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_rollout(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(help="cycle recipe; a 'janus' backend is benchmarked against "
                                                   "transformers' generate (default: the embedded model)")] = None,
    random_weights: Annotated[bool, typer.Option(help="janus: random weights of the recipe's shapes")] = False,
    prompts: Annotated[Optional[int], typer.Option(help="prompts (janus default 32, embedded 64)")] = None,
    samples: Annotated[Optional[int], typer.Option(help="images per prompt (default 8)")] = None,
    cfg_scale: Annotated[float, typer.Option(help="janus: guidance scale")] = 5.0,
    batch: Annotated[Optional[list[int]], typer.Option(help="janus: images per engine call (repeatable)")] = None,
    generate: Annotated[bool, typer.Option(help="janus: also time transformers' generate")] = True,
    compare: Annotated[int, typer.Option(help="janus: prompts checked token by token against generate")] = 0,
) -> None:
    """Sampling throughput, JSON with images_per_s: the embedded model, or a Janus recipe's rollout engine against
    transformers' generate in the same run (extra options go to the embedded benchmark)."""
    backend = load_cycle_config(config, []).model.backend if config is not None else "embedded"
    if backend == "janus":
        from model.janus.bench import bench_rollout as run

        typer.echo(json.dumps(run(str(config), random_weights, prompts or 32, samples or 8, cfg_scale,
                                  tuple(batch or [256]), generate, compare)))
        return
    from typer.main import get_command

    from model.embedded.commands import bench_rollout as embedded_bench

    sub = typer.Typer()
    sub.command()(embedded_bench)
    args = list(ctx.args) + (["--prompts", str(prompts)] if prompts else []) + (["--samples", str(samples)]
                                                                              if samples else [])
    get_command(sub).main(args=args, standalone_mode=False)


if __name__ == "__main__":
    app()
