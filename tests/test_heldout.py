"""The held-out suite stays held out at every benchmark size: propose excludes every prompt any size could
measure, and seed prompts from the suite never reach the few-shot library."""

from collections import defaultdict

import pyarrow as pa
import pytest
import yaml

from configs.schema import BenchmarkConfig, ProposeConfig, read_seed_file
from storage import DatasetRef, build, fingerprint
from tasks import propose, suite
from tasks.select import LIBRARY
from tasks.stage import StageContext, part_stats, prompt_id, read, run_in_process
from tasks.suite import suite_prompts

SMALL = BenchmarkConfig(prompts_per_category=2)
HELD_OUT = "held out for the benchmark suite"


def by_category(pairs) -> dict[str, list[str]]:
    out = defaultdict(list)
    for c, p in pairs:
        out[c].append(p)
    return out


@pytest.fixture(scope="module")
def full():
    """category -> every prompt a benchmark of any size could measure, for the default suite seed."""
    return by_category(suite_prompts(BenchmarkConfig(), full=True))


@pytest.fixture(scope="module")
def ctx(base_model, tmp_path_factory):
    return StageContext(store=str(tmp_path_factory.mktemp("heldout")), run="h", model_loader=lambda: base_model,
                        model_id=base_model.model_id, log=lambda _: None)


@pytest.fixture(scope="module")
def held(ctx):
    return run_in_process(suite, {}, SMALL, ctx)


def run_propose(ctx, held, seed_file=None, n=200):
    cfg = ProposeConfig(num_prompts=n, **({"seed_file": str(seed_file)} if seed_file else {}))
    ref = run_in_process(propose, held, cfg, ctx)["prompts"]
    return read(ref).to_pylist(), part_stats(ref)


def test_a_smaller_suite_is_a_prefix_of_the_full_one_per_category(held, full):
    for size in (1, 2, 7, 100):
        small = by_category(suite_prompts(BenchmarkConfig(prompts_per_category=size)))
        assert small.keys() == full.keys()
        for cat, prompts in small.items():
            assert prompts == full[cat][: len(prompts)], (size, cat)
    stored = read(held["suite"], ["category", "prompt"]).to_pylist()
    assert by_category((r["category"], r["prompt"]) for r in stored) == {c: ps[:2] for c, ps in full.items()}
    heldout = read(held["heldout"], ["category", "prompt"]).to_pylist()
    assert by_category((r["category"], r["prompt"]) for r in heldout) == full


def test_propose_with_a_small_benchmark_never_proposes_a_full_suite_prompt(ctx, held, full):
    rows, _ = run_propose(ctx, held)
    canon = {ctx.model.canonical_prompt(p)[0] for ps in full.values() for p in ps}
    valid = [r for r in rows if r["valid"]]
    assert len(valid) == 200
    assert not {ctx.model.canonical_prompt(r["prompt"])[0] for r in valid} & canon
    small = {p for ps in full.values() for p in ps[:2]}
    refused = [r["prompt"] for r in rows if r["invalid_reason"] == HELD_OUT]
    assert set(refused) - small, "no proposal beyond the run's own suite was refused: the exclusion was not exercised"


def test_the_shipped_seed_file_has_no_suite_prompt(full):
    seeds = read_seed_file(ProposeConfig().seed_file)
    assert not {p for ps in seeds.values() for p in ps} & {p for ps in full.values() for p in ps}


def library(ctx, prompts: dict[str, list[str]]) -> DatasetRef:
    """A seed_library dataset of these prompts, as select writes it."""
    rows = [{"prompt_id": prompt_id(p), "prompt": p, "category": c, "score": 9, "cycle": 0}
            for c, ps in prompts.items() for p in ps]
    ref = DatasetRef(store=ctx.store, run=ctx.run, stage="seed_library",
                     fingerprint=fingerprint("library", rows, {}, None, "1"))
    build(ref, 1, lambda _: pa.Table.from_pylist(rows, schema=LIBRARY), config={}, upstream={}, model_id=None,
          code_version="1", log=lambda _: None)
    return ref


def test_suite_prompts_among_the_seeds_are_screened_out(ctx, held, full, tmp_path):
    seeds = read_seed_file(ProposeConfig().seed_file)
    # beyond the run's own size: only the full suite holds them
    planted = {c: full[c][-2:] for c in seeds}
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump({c: seeds[c] + planted[c][:1] for c in seeds}))
    lib = library(ctx, {c: planted[c][1:] for c in seeds})
    rows, stats = run_propose(ctx, {**held, "seed_library": lib}, path, n=100)
    assert stats["seeds_held_out"] == sum(map(len, planted.values()))
    planted_ids = {prompt_id(p) for ps in planted.values() for p in ps}
    cited = {i for r in rows for i in r["seed_prompt_ids"]}
    assert cited and not cited & planted_ids
