"""Trust: every bad input fails before any work, with one line and exit 2, and writes nothing; a run's refs never
leave its store; a path means one file in every process; identical whole-dataset stages wait for each other."""

import dataclasses
import json
import math
import string
import threading
import time
import types
import typing
from pathlib import Path

import pyarrow as pa
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from configs.loader import load_config
from configs.schema import CycleConfig
from flows.cli import app
from flows.dags import GENERATE
from storage import Dataset, DatasetRef, RunRecord, RunRecords, build

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs/cycle/smoke.yaml")
runner = CliRunner()


def refused(args: list[str], store: Path) -> str:
    """The one error line of a refused command, after checking that it exited 2 and wrote nothing."""
    before = sorted(store.rglob("*")) if store.exists() else None
    res = runner.invoke(app, args)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, (args, res.output, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, res.output)
    assert (sorted(store.rglob("*")) if store.exists() else None) == before, f"{args} wrote to the store"
    return lines[0]


@pytest.mark.parametrize("override, named", [
    ("judge.judge=foo", "unknown judge 'foo'"),
    ("judge.judge=oracle", "judge.judge='oracle' measures only"),
    ("gate.metric=foo", "gate.metric"),
    ("gate.understanding_metric=und_acc", "gate.understanding_metric"),
    ("propose.category_shares={bogus: 1}", "category_shares names ['bogus']"),
    ("rollout.cfg_max=.inf", "rollout.cfg_max: input should be a finite number"),
    ("propose.num_prompts=true", "propose.num_prompts: input should be a valid integer"),
    ("propose.seed_file=/nonexistent/seeds.yaml", "no such seed file: /nonexistent/seeds.yaml"),
    ("propose.examples_per_call=[3, 1]", "1 <= least <= most"),
    ("model.checkpoint=nope", "model.checkpoint 'nope'"),
    ("model.registry_line=../x", "registry_line '../x'"),
    ("stages.scale={paint: 2}", "stages.scale names ['paint']"),
    ("run.cluster=somewhere", "run.cluster"),
    ("benchmark.suite=geneval", "suite 'geneval' is measured by evaluator 'vlm'"),
    ("judge.judge=vlm", "judge 'vlm' needs a vlm section"),
    ("judge.vlm={model: x, endpoint: ftp://h}", "expected an http(s):// base URL"),
])
def test_a_bad_value_is_one_line_before_any_work(tmp_path, override, named):
    store = tmp_path / "store"
    line = refused(["run", SMOKE, f"run.store={store}", override], store)
    assert named in line


def test_a_bad_refresh_list_stage_name_or_pointer_is_one_line(tmp_path):
    store = tmp_path / "store"
    assert "--refresh names ['bogus']" in refused(["generate", SMOKE, f"run.store={store}", "--refresh", "bogus"],
                                                  store)
    cfg = load_config(SMOKE, CycleConfig, [f"run.store={store}"])
    RunRecords(str(store), "r").save(RunRecord(run="r", cycle=0, dag=dataclasses.asdict(GENERATE),
                                               config=cfg.model_dump(mode="json"), checkpoint_id="x"))
    assert "stage 'paint' is not in run 'r'" in refused(["stage", "paint", "--run", "r", "--store", str(store)],
                                                        store)
    pointer = store / "checkpoints" / "default" / "promoted.json"
    pointer.parent.mkdir(parents=True)
    for text in ("{", '{"checkpoint_id": "0123456789abcdef"}'):  # truncated, dangling
        pointer.write_text(text)
        line = refused(["run", SMOKE, f"run.store={store}", "model.checkpoint=promoted"], store)
        assert str(pointer) in line and "selfplay checkpoints promote" in line
    res = runner.invoke(app, ["--debug", "run", SMOKE, f"run.store={store}", "judge.judge=foo"])
    assert res.exit_code == 1 and type(res.exception).__name__ == "ConfigError"  # --debug: the traceback


# --- the config schema, property-based: any invalid value of any field ------------------------------------------
TEXT = st.text(alphabet=string.ascii_letters + string.digits + " ._-", max_size=10)
NOT_NUMBERS = st.one_of(st.booleans(), TEXT, st.lists(st.integers(), max_size=2))
NONFINITE = st.sampled_from([math.inf, -math.inf, math.nan])


def _bounds(meta) -> dict[str, float]:
    return {k: getattr(m, k) for m in meta for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}


def _out_of_range(b: dict[str, float], integer: bool) -> list[st.SearchStrategy]:
    out = []
    num = st.integers if integer else (lambda **kw: st.floats(allow_nan=False, allow_infinity=False, **kw))
    if "ge" in b:
        out.append(num(max_value=b["ge"] - 1) if integer else num(max_value=b["ge"], exclude_max=True))
    if "gt" in b:
        out.append(num(max_value=b["gt"]))
    if "le" in b:
        out.append(num(min_value=b["le"] + 1) if integer else num(min_value=b["le"], exclude_min=True))
    if "lt" in b:
        out.append(num(min_value=b["lt"]))
    return out


def invalid_values(section: str, name: str, ann: typing.Any, meta: list) -> st.SearchStrategy:
    """Values of the wrong type or out of range for one field, as YAML would carry them."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if (section, name) == ("run", "name"):
        return st.sampled_from(["../x", "a/b", "", "/abs", ".hidden"]) | st.integers()
    if (section, name) == ("run", "cluster"):
        return TEXT.filter(lambda v: v not in ("local", "dask")) | st.integers()
    if (section, name) == ("judge", "judge"):
        return TEXT.filter(lambda v: v not in ("self", "oracle", "vlm"))
    if (section, name) == ("model", "backend"):
        from model.registry import names
        return TEXT.filter(lambda v: v not in names()) | st.integers()
    if ann is bool:
        return st.integers() | TEXT | st.floats()
    if ann is int:
        return st.one_of(NOT_NUMBERS, NONFINITE, st.floats().filter(lambda v: v != int(v) if math.isfinite(v)
                                                                    else True), *_out_of_range(_bounds(meta), True))
    if ann is float:
        return st.one_of(NOT_NUMBERS, NONFINITE, *_out_of_range(_bounds(meta), False))
    if ann is str:
        return st.integers() | st.booleans() | st.lists(TEXT, max_size=2)
    if origin is typing.Literal:
        return TEXT.filter(lambda v: v not in args) | st.integers()
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # optional: the value's own invalid ones
        (inner,) = [a for a in args if a is not type(None)]
        return invalid_values(section, name, inner, meta)
    if origin is typing.Union and bool in args:  # compile: bool | 'auto' (strict: no number is a boolean)
        return st.integers() | st.floats() | TEXT.filter(lambda v: v != "auto")
    if origin is typing.Union:  # nproc: int | 'auto'
        return st.booleans() | st.integers(max_value=0) | TEXT.filter(lambda v: v != "auto")
    if ann is dict:
        return st.integers() | TEXT | st.lists(st.integers(), min_size=1, max_size=2)
    if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):  # a nested section (vlm): not a mapping, or
        return st.integers() | TEXT | st.fixed_dictionaries({"model": st.integers()})  # a mapping with a bad field
    if origin is dict:
        bad_value = (st.booleans() | TEXT | NONFINITE) if args[1] is float else (st.booleans() | TEXT | st.integers(max_value=0))
        key = st.sampled_from(typing.get_args(args[0])) if typing.get_origin(args[0]) is typing.Literal \
            else st.sampled_from(["rollout", "judge"])
        return st.integers() | TEXT | st.dictionaries(key, bad_value, min_size=1, max_size=1)
    if origin is tuple:
        return st.one_of(st.integers(), st.lists(st.integers(1, 3), min_size=3, max_size=4),
                         st.tuples(st.booleans(), st.integers(1, 3)).map(list), st.tuples(TEXT, st.integers(1, 3)).map(list))
    if origin is list:
        return st.integers() | TEXT | st.lists(st.integers(), min_size=1, max_size=2)
    raise AssertionError(f"no invalid values for {section}.{name}: {ann}")


def _fields() -> list[tuple[str, str, typing.Any, list]]:
    out = []
    for section, field in CycleConfig.model_fields.items():
        for name, f in type(field.get_default(call_default_factory=True)).model_fields.items():
            out.append((section, name, f.annotation, f.metadata))
    return out


FIELDS = _fields()


def as_yaml(value: typing.Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value)  # JSON is YAML


@st.composite
def bad_override(draw):
    section, name, ann, meta = draw(st.sampled_from(FIELDS))
    return section, name, draw(invalid_values(section, name, ann, meta))


@pytest.fixture(scope="module")
def property_store(tmp_path_factory):
    return tmp_path_factory.mktemp("property") / "store"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_override())
def test_any_invalid_value_of_any_field_exits_2_with_one_message_and_writes_nothing(property_store, bad):
    section, name, value = bad
    line = refused(["run", SMOKE, f"run.store={property_store}", f"{section}.{name}={as_yaml(value)}"],
                   property_store)
    assert name in line or section in line, line


def test_every_field_has_invalid_values():
    assert len(FIELDS) > 60
    for section, name, ann, meta in FIELDS:
        invalid_values(section, name, ann, meta)  # raises for a field type the property cannot reach


def test_the_gate_metrics_are_the_benchmarks_paired_metrics(tmp_path):
    from configs.schema import PairedMetric
    from tasks.stats import per_prompt

    from configs.schema import evaluator_metrics

    row = {"evaluator": "oracle", "evaluator_ok": [True, False], "self_score": [8, 3], "unicycle_soft": 1.0,
           "unicycle_hard": 1.0, "und_true": 1.0, "und_perturbed": 0.0}
    vlm_row = {**row, "evaluator": "vlm:judge", "und_perturbed": None}
    measured = {ev: {k for k in per_prompt([r], 7.0) if not k.startswith("_")}
                for ev, r in (("oracle", row), ("vlm", vlm_row))}
    assert set(typing.get_args(PairedMetric)) == measured["oracle"] | measured["vlm"]
    for ev, other in (("oracle", "vlm"), ("vlm", "oracle")):  # each evaluator's own metrics, and only those
        assert set(evaluator_metrics(ev)) == measured[ev] - measured[other]


# --- one meaning per path ----------------------------------------------------------------------------------------
def test_paths_are_resolved_once_in_the_launching_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    cfg = load_config(SMOKE, CycleConfig, ["run.store=runs", "model.checkpoint=weights"])
    assert cfg.run.store == str(tmp_path / "runs")
    assert cfg.model.checkpoint == str(tmp_path / "weights")
    assert Path(cfg.propose.seed_file).is_absolute() and Path(cfg.propose.seed_file).is_file()
    assert load_config(SMOKE, CycleConfig, ["run.store=s3://bucket/runs"]).run.store == "s3://bucket/runs"
    # a rerun from another directory, its store given relative to there, finds the run
    recorded = cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": "x"})})
    RunRecords(cfg.run.store, "r").save(RunRecord(run="r", cycle=0, dag=dataclasses.asdict(GENERATE),
                                                  config=recorded.model_dump(mode="json"), checkpoint_id="x"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from flows.cycle import plan_rerun

    with pytest.raises(Exception, match="model.checkpoint 'x'"):  # found the record, then its checkpoint
        plan_rerun("judge", "r", store="../runs")


# --- locks: a second identical whole-dataset stage waits, then reuses --------------------------------------------
def test_a_second_identical_whole_dataset_build_waits_then_reuses(tmp_path):
    ref = DatasetRef(store=str(tmp_path), run="r", stage="checkpoint", fingerprint="f" * 64)
    calls, results = [], []

    def slow(_: int) -> pa.Table:
        calls.append(time.time())
        time.sleep(1.0)
        return pa.table({"x": [len(calls)]})

    def one():
        results.append(build(ref, 1, slow, config={}, upstream={}, model_id=None, code_version="1",
                             log=lambda _: None))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r.reused or not r.computed_parts for r in results) == [False, True]
    assert Dataset(ref).read().column("x").to_pylist() == [1]
