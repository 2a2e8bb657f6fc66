"""`selfplay`: the command line. Commands parse arguments and hand over to flows and stages; no logic lives here."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

# fresh SQLite databases log 'database is locked' with the server's analytics on
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# OpenMP spin-waiting collapses torch's 2-thread decoding whenever another process is busy (set before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

class _Commands(TyperGroup):
    """The root command group: an expected failure anywhere below it is one line and exit 2 (its traceback
    with --debug); anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except expected_errors() as exc:
            if _OPTIONS["debug"]:
                raise
            fail(str(exc))


app = typer.Typer(
    cls=_Commands,
    help="Self-play post-training for unified multimodal models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks that print JSON as their last line.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and validate configs.", no_args_is_help=True)
ckpt_app = typer.Typer(help="The checkpoint registry: list, verify and promote.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(config_app, name="config")
app.add_typer(ckpt_app, name="checkpoints")

ConfigPath = Annotated[Path, typer.Argument(help="YAML recipe, e.g. configs/cycle/tiny.yaml")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides")]


_OPTIONS = {"debug": False}


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="show a traceback for expected errors too")]
             = False) -> None:
    _OPTIONS["debug"] = debug


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a user's input or store can cause (one line, exit 2), as opposed to a bug (a traceback)."""
    from configs.loader import ConfigError
    from flows.cluster import ClusterError
    from flows.dags import DagError
    from flows.preflight import PreflightError
    from model.registry import UnknownBackendError
    from model.vlm import VLMUnreachableError
    from storage import CorruptPartError, InvalidNameError, RegistryError, RunRecordError

    return (ConfigError, PreflightError, DagError, ClusterError, RegistryError, RunRecordError, InvalidNameError,
            UnknownBackendError, CorruptPartError, VLMUnreachableError)


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: not a KeyboardInterrupt, which the command line would answer with 'Aborted!'."""


def _interrupted(signum, frame) -> None:
    _silence()
    raise Interrupted


def _silence() -> None:
    """After an interrupt: what is left to say is ours (the flow's crash report and the API client's connection
    errors while the local server stops would bury it)."""
    import logging

    if logging.root.manager.disable >= logging.CRITICAL:
        return  # silenced already (a second signal)
    logging.disable(logging.CRITICAL)
    err = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    sys.stderr = os.fdopen(err, "w")


def _silence_on_termination() -> None:
    """A flow run takes SIGTERM over (Prefect's engine reports the crash, then signals again): the first record
    that reports it silences the rest, that record included."""
    import logging

    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = make(*args, **kwargs)
        if "aborted by a termination signal" in str(record.msg):
            _silence()
        return record

    logging.setLogRecordFactory(factory)


def main() -> None:
    """`selfplay`: Ctrl-C or SIGTERM stops with one line and exit 130, everything already committed kept for the
    rerun to resume from."""
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    _silence_on_termination()
    try:
        app()
    except (Interrupted, KeyboardInterrupt):
        _silence()
        typer.secho("interrupted: stopped; rerun the same command to resume (committed shards and trainer "
                    "checkpoints are kept)", fg="yellow", err=True)
        sys.stderr.flush()
        sys.exit(130)


def call_flow(fn, cfg, *args, dag=None, refresh=(), runs_stages: bool = True, **kwargs):
    """A flow, after its preflight (flows/preflight.py: the DAG it runs, the checkpoint, the refresh list) and
    a check that the scheduler answers, so what is wrong is said before any work. A flow that runs its DAG's
    stages itself gets the task runner `run.cluster` asks for, so its run shows them."""
    from flows.cluster import task_runner
    from flows.preflight import preflight

    if dag is not None:
        preflight(dag, cfg, refresh)
    runner = task_runner(cfg)  # an unreachable scheduler stops here
    return (fn.with_options(task_runner=runner) if runs_stages else fn)(cfg, *args, **kwargs)


def load_cycle_config(path: Path | None, overrides: list[str] | None):
    from configs.loader import load_config
    from configs.schema import CycleConfig

    return load_config(path, CycleConfig, overrides or [])


@config_app.command("show")
def config_show(config: ConfigPath, overrides: Overrides = None) -> None:
    """Validate a cycle config with overrides and print it resolved, as YAML."""
    import yaml

    cfg = load_cycle_config(config, overrides)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _line_registry(store: str, line: str):
    """The line's registry, or one error line when there is none there."""
    from storage import Registry

    try:
        reg = Registry(store, line)
    except ValueError as exc:
        fail(str(exc))
    if not reg.store.exists(reg.root):
        fail(f"no checkpoint registry at {reg.root} (store {store!r}, line {line!r})")
    return reg


def _promoted_id(reg) -> tuple[str | None, str | None]:
    """(the promoted id, what is wrong with the pointer)."""
    from storage import RegistryError

    try:
        return reg.promoted_id(), None
    except RegistryError as exc:
        return None, str(exc)


@ckpt_app.command("list")
def checkpoints_list(store: str = "./runs", line: str = "default") -> None:
    """List the line's checkpoints with their parent, cycle, metrics and damage (JSON lines)."""
    reg = _line_registry(store, line)
    promoted, bad_pointer = _promoted_id(reg)
    rows = [m.model_dump(include={"checkpoint_id", "parent", "cycle", "data_fingerprint", "metrics"})
            for m in reg.list()]
    listed = {r["checkpoint_id"] for r in rows}
    rows += [{"checkpoint_id": c} for c in reg.ids() if c not in listed]  # its meta unreadable: verify says so
    for row in rows:
        problems = reg.verify(row["checkpoint_id"])
        row.update(promoted=row["checkpoint_id"] == promoted, intact=not problems, problems=problems)
        typer.echo(json.dumps(row))
    if bad_pointer:
        fail(bad_pointer)


@ckpt_app.command("promote")
def checkpoints_promote(checkpoint_id: str, store: str = "./runs", line: str = "default") -> None:
    """Point the line's 'promoted' pointer at a registered checkpoint (atomic switch)."""
    from storage import Registry, RegistryError

    try:
        Registry(store, line).promote(checkpoint_id)
    except (RegistryError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"promoted {checkpoint_id}")


@ckpt_app.command("verify")
def checkpoints_verify(
    checkpoint_id: Annotated[Optional[str], typer.Argument(help="one checkpoint; default: the whole line")] = None,
    store: str = "./runs", line: str = "default",
) -> None:
    """Check checkpoints' files and the promoted pointer (JSON lines, a summary last); exit 1 on damage, as fsck."""
    reg = _line_registry(store, line)
    ids = reg.ids()
    if checkpoint_id is not None:
        if checkpoint_id not in ids:
            fail(f"no checkpoint {checkpoint_id!r} in registry {reg.root}")
        ids = [checkpoint_id]
    damaged = []
    for ckpt in ids:
        problems = reg.verify(ckpt)
        damaged += [ckpt] if problems else []
        typer.echo(json.dumps({"checkpoint_id": ckpt, "intact": not problems, "problems": problems}))
    promoted, bad_pointer = _promoted_id(reg)
    promoted_ok = bad_pointer is None and (
        promoted is None or (promoted not in damaged if promoted in ids else not reg.verify(promoted)))
    summary = {"checked": len(ids), "damaged": damaged, "promoted": promoted, "promoted_ok": promoted_ok}
    typer.echo(json.dumps(summary | ({"promoted_problem": bad_pointer} if bad_pointer else {})))
    if damaged or not promoted_ok:
        raise typer.Exit(1)


datasets_app = typer.Typer(help="The store's datasets: verify.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


@datasets_app.command("verify")
def datasets_verify(store: str = "./runs",
                    run: Annotated[Optional[str], typer.Option(help="one run (default: every run)")] = None) -> None:
    """Check every dataset's parts against its manifest (JSON lines, a summary last); exit 1 on damage, as fsck.
    A damaged dataset is recomputed, only its bad parts, by the next run that needs it."""
    from configs.schema import resolve_store
    from storage import Store
    from storage.dataset import check_store

    root = resolve_store(store)
    if not Store(root).exists(root):
        fail(f"no store at {root}")
    damaged, checked = [], 0
    try:
        for report in check_store(root, run):
            checked += 1
            damaged += [report["dataset"]] if not report["intact"] else []
            typer.echo(json.dumps(report))
    except FileNotFoundError as exc:
        fail(str(exc))
    typer.echo(json.dumps({"checked": checked, "damaged": damaged}))
    if damaged:
        raise typer.Exit(1)


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

    from flows.dags import CYCLE

    summary = call_flow(cycle_flow, cfg, dag=CYCLE)
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

    from flows.dags import CYCLE

    results = call_flow(nightly_flow, cfg, cycles, dag=CYCLE, runs_stages=False)  # each cycle is a flow run of its own
    for summary in results:
        _print_cycle(summary)
    from flows.ablate import ci95

    def ci(delta: dict) -> dict:
        return {"delta": round(delta["delta"], 4), "ci95": ci95(delta)}

    typer.echo(json.dumps([{"cycle": s["cycle"], "promoted": s["promoted"], "seconds": s["seconds"],
                            "gen_acc_oracle_change": ci(s["delta_gen_acc_oracle"]),
                            "judge_on_parent_images_change": ci(s["delta_judge_on_parent_images"]),
                            "discard_pool_offered": s["generation"]["propose"].get("from_discard_pool"),
                            "parent": s["parent"], "child": s["child"]} for s in results]))


ablate_app = typer.Typer(help="Ablations on the embedded model.", no_args_is_help=True)
app.add_typer(ablate_app, name="ablate")


@ablate_app.command("cpr")
def ablate_cpr(config: Annotated[Path, typer.Argument(help="cycle recipe")] = Path("configs/cycle/tiny.yaml"),
               overrides: Overrides = None,
               cpr_mixture: Annotated[Optional[list[str]], typer.Option(
                   help="KIND=WEIGHT over UniCorn's 5:5:3:1 for the cpr arm (repeatable), e.g. reflection=0")] = None,
               arm: Annotated[Optional[list[str]], typer.Option(
                   help="an arm to train (repeatable; default gen_only, cpr, dpo, grpo): gen_only, cpr, dpo, grpo, "
                        "or ceiling (SFT on true renders of the same prompts: a reference, not self-play)")] = None
               ) -> None:
    """Generation-only SFT vs the CPR mixture vs DPO vs GRPO on the same self-generated data (JSON last line)."""
    cfg = load_cycle_config(config, overrides)
    from pydantic import ValidationError

    from configs.schema import ReconstructConfig
    from flows.ablate import FULL_MIXTURE, ablate_cpr_flow, arms_with
    from flows.dags import DEFAULT_ARMS, ablation

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
    try:
        arms = arms_with(mixture, arm or DEFAULT_ARMS)
    except ValueError as exc:
        fail(f"--arm: {exc}")
    typer.echo(json.dumps(call_flow(ablate_cpr_flow, cfg, mixture, list(arms), dag=ablation(arms))))


@app.command("generate")
def generate(config: ConfigPath, overrides: Overrides = None,
             refresh: Annotated[Optional[list[str]], typer.Option(help="stage to recompute (repeatable)")] = None
             ) -> None:
    """The generation side of a cycle: propose -> rollout -> judge -> select, cached by fingerprint."""
    cfg = load_cycle_config(config, overrides)
    from flows.cycle import generate_flow

    from flows.dags import GENERATE

    summary = call_flow(generate_flow, cfg, dag=GENERATE, refresh=refresh or [])
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
    from flows.cycle import plan_rerun, stage_flow

    plan_rerun(name, run, cycle, overrides or [], store, only, refresh)  # what is wrong, before the flow starts
    typer.echo(json.dumps(stage_flow(name, run, cycle, overrides or [], store, only, refresh)))


@bench_app.command("storage")
def bench_storage(rows: int = 20_000, parts: int = 20) -> None:
    """Write, verify and read an image dataset through the artifact store."""
    from storage.bench import bench_storage as run

    typer.echo(json.dumps(run(rows=rows, parts=parts)))


@bench_app.command("judge")
def bench_judge(judgements: int = 100, concurrency: int = 8,
                model_dir: Annotated[Optional[str], typer.Option(help="a VLM vLLM loads (default: the tiny random "
                                                                  "Qwen2-VL the tests serve)")] = None,
                served_name: str = "tiny-qwen2-vl") -> None:
    """The external VLM judge's judgements/s through both transports (HTTP endpoint, in-process engine), JSON."""
    from flows.bench import bench_judge as run

    typer.echo(json.dumps(run(judgements=judgements, model_dir=model_dir, served_name=served_name,
                              concurrency=concurrency)))


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

    from flows.dags import GENERATE
    from flows.preflight import preflight

    preflight(GENERATE, load_cycle_config(config, overrides))  # a bad recipe stops here, before any cluster starts
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
    main()
