"""propose: the model writes its own prompts.

Each call gets a category (drawn by the configured shares) and 1-3 few-shot seeds of that category from the
seed library: the recipe's seed prompts plus the judge's best prompts of earlier cycles (the `seed_library`
input, written by select). Prompts from the previous discard pool are offered again (curriculum). Exact and
near duplicates (same canonical form) are removed; invalid proposals are kept with their reason and counted.
The held-out benchmark suite (the `heldout` input: every prompt any benchmark size could measure, whatever this
run's size) is never proposed, nor offered as a few-shot seed, which would steer proposals towards it.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pyarrow as pa

from configs.schema import ProposeConfig, read_seed_file
from model.protocol import require_role
from storage import DatasetRef
from tasks.stage import POOL_SOURCE, StageContext, StagePlan, StageSpec, make_plan, prompt_id, read, stable_seed

MAX_PROMPT_CHARS = 300

SCHEMA = pa.schema([("prompt_id", pa.string()), ("cycle", pa.int32()), ("category", pa.string()),
                    ("prompt", pa.string()), ("seed_prompt_ids", pa.list_(pa.string())), ("source", pa.string()),
                    ("valid", pa.bool_()), ("invalid_reason", pa.string())])
STAGE = StageSpec(name="propose", code_version="2", section="propose", optional=("heldout", "discard_pool",
                  "seed_library"), outputs={"prompts": SCHEMA}, sharded=True)


def _canonical(model, text: str) -> tuple[str | None, str | None, str | None]:
    """(canonical form, category, invalid reason) from the backend's grammar, else generic checks."""
    if hasattr(model, "canonical_prompt"):
        return model.canonical_prompt(text)
    norm = re.sub(r"\s+", " ", text.strip().lower()).strip(" .")
    if not norm:
        return None, None, "empty prompt"
    if len(text) > MAX_PROMPT_CHARS:
        return None, None, f"longer than {MAX_PROMPT_CHARS} characters"
    return norm, None, None


def plan(inputs: dict[str, DatasetRef], cfg: ProposeConfig, ctx: StageContext) -> StagePlan:
    seeds = read_seed_file(cfg.seed_file)
    # the seeds' content, not their file name, is part of the fingerprint
    return make_plan(STAGE, inputs, {**cfg.model_dump(mode="json", exclude={"seed_file"}), "seeds": seeds}, ctx,
                     seeds=seeds, cfg=cfg)


def _held_out(p: StagePlan, model) -> set[str]:
    """The full held-out suite's prompts in canonical form."""
    if "heldout" not in p.inputs:
        return set()
    texts = read(p.inputs["heldout"], ["prompt"]).column("prompt").to_pylist()
    return {_canonical(model, t)[0] for t in texts} - {None}


def _library(p: StagePlan, model, held_out: set[str]) -> tuple[dict[str, list[tuple[str, str]]], int]:
    """category -> [(prompt_id, prompt)]: the recipe's seeds, then earlier cycles' best prompts, less those held
    out; and how many were held out."""
    rows = [(c, prompt_id(t), t) for c, ts in p.extra["seeds"].items() for t in ts]
    if "seed_library" in p.inputs:
        rows += [(r["category"], r["prompt_id"], r["prompt"])
                 for r in read(p.inputs["seed_library"], ["prompt_id", "prompt", "category"]).to_pylist()]
    lib: dict[str, list[tuple[str, str]]] = {}
    for c, pid, t in rows:
        if _canonical(model, t)[0] not in held_out:
            lib.setdefault(c, []).append((pid, t))
    return lib, len(rows) - sum(map(len, lib.values()))


def _categories(cfg: ProposeConfig, lib: dict) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The categories to draw from and their weights (default: every category of the library, equally)."""
    shares = cfg.category_shares or {c: 1.0 for c in lib}
    unknown = sorted(set(shares) - set(lib))
    if unknown:
        raise ValueError(f"propose.category_shares names categories with no seed prompts: {unknown}")
    return tuple(zip(*[(c, w) for c, w in shares.items() if w > 0]))


def compute_part(p: StagePlan, i: int, ctx: StageContext) -> pa.Table:
    cfg: ProposeConfig = p.extra["cfg"]
    model = ctx.model
    require_role(model, "propose")
    rng = random.Random(stable_seed(ctx.run_seed, ctx.cycle, "propose"))
    held_out = _held_out(p, model)
    lib, n_held = _library(p, model, held_out)
    if n_held:
        ctx.log(f"[propose] {n_held} seed prompts are in the held-out suite: left out of the few-shot library")
    cats, weights = _categories(cfg, lib)
    rows, seen = [], set()
    stats = Counter(seeds_held_out=n_held)

    def add(text, category, source, seed_ids):
        canon, cat, reason = _canonical(model, text)
        if reason is None and canon in held_out:
            reason = "held out for the benchmark suite"
        if reason is None and canon in seen:
            stats["duplicates_removed"] += 1
            return False
        pid = prompt_id(text if reason is None else f"{text}\x00invalid\x00{len(rows)}")
        if reason is None:
            seen.add(canon)
        stats["valid" if reason is None else "invalid"] += 1
        rows.append({"prompt_id": pid, "cycle": ctx.cycle, "category": cat or category, "prompt": text,
                     "seed_prompt_ids": seed_ids, "source": source, "valid": reason is None,
                     "invalid_reason": reason})
        return reason is None

    # 1. the previous discard pool, oldest first (curriculum), up to its share
    n_pool = 0
    if "discard_pool" in p.inputs:
        pool = sorted(read(p.inputs["discard_pool"]).to_pylist(), key=lambda r: (-r["cycles_tried"], r["prompt_id"]))
        for r in pool[: int(cfg.discard_pool_share * cfg.num_prompts)]:
            n_pool += add(r["prompt"], r["category"], POOL_SOURCE, [])
    # 2. fresh proposals until enough valid unique prompts or attempts run out
    want, attempts, batch = cfg.num_prompts - n_pool, 0, 256
    max_attempts = cfg.max_attempts_factor * max(want, 1)
    while stats["valid"] - n_pool < want and attempts < max_attempts:
        n = min(batch, max_attempts - attempts, 2 * (want - (stats["valid"] - n_pool)) + 8)
        calls = []
        for _ in range(n):
            cat = rng.choices(cats, weights)[0]
            k = rng.randint(*cfg.examples_per_call)
            calls.append((cat, rng.sample(lib[cat], min(k, len(lib[cat]))), rng.randrange(2**31)))
        attempts += n
        texts = model.propose([c for c, _, _ in calls], [[t for _, t in ex] for _, ex, _ in calls],
                              [s for _, _, s in calls], temperature=cfg.temperature)
        for (cat, ex, _), text in zip(calls, texts):
            if stats["valid"] - n_pool >= want:
                break
            add(text, cat, "proposed", [pid for pid, _ in ex])
    stats["attempts"] = attempts
    stats["from_discard_pool"] = n_pool
    valid_new = stats["valid"] - n_pool
    ctx.log(f"[propose] {stats['valid']} valid ({n_pool} from the discard pool), {stats['invalid']} invalid, "
            f"{stats['duplicates_removed']} duplicates removed, {attempts} proposals")
    if valid_new < want:
        ctx.log(f"[propose] warning: only {valid_new} of {want} new prompts after {attempts} proposals")
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return table.replace_schema_metadata({"stats": json.dumps(dict(stats))})

