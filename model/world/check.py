"""`world_check`: the world's acceptance numbers on fresh seeded samples (see issue 3)."""

from __future__ import annotations

import random
import time

import numpy as np

from .corrupt import edge_noise
from .facts import check_facts, facts
from .language import parse, perturb, prompt_count, sample_prompt, sample_scene
from .oracle import verify
from .scene import render
from .vocab import CATEGORIES


def world_check(n: int = 10000, seed: int = 0, size: int = 32) -> dict:
    """For n prompts (round robin over categories): parse round trip; oracle on a render of a true scene (all
    facts must check out); oracle on a render of a minimally perturbed spec (must reject the original prompt); the
    same two on the renders after colour noise and a 1-px edge error (`*_noisy`: what a lossy tokenizer does)."""
    per = {c: {"n": 0, "acc_gt": 0, "reject_perturbed": 0, "acc_noisy": 0, "reject_noisy": 0} for c in CATEGORIES}
    noise_rng = np.random.default_rng(seed)
    roundtrip = 0
    verify_s = 0.0
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        rng = random.Random(f"{seed}:{i}")
        text = sample_prompt(cat, rng)
        parsed = parse(text)
        roundtrip += parsed.ok and parsed.spec.to_text() == text and parsed.spec.category == cat
        spec = parsed.spec
        true_img = render(sample_scene(spec, rng), size)
        bad = perturb(spec, rng)
        bad_scene = sample_scene(bad, rng)
        # The perturbation must falsify a primary fact in ground truth; otherwise the check would be meaningless.
        assert not all(ok for f, ok in zip(facts(spec), check_facts(spec, bad_scene)) if f.primary), (text, bad)
        bad_img = render(bad_scene, size)
        t0 = time.perf_counter()
        good, rejected = verify(text, true_img), not verify(text, bad_img).ok
        verify_s += time.perf_counter() - t0
        row = per[cat]
        row["n"] += 1
        row["acc_gt"] += good.ok and all(good.fact_ok)
        row["reject_perturbed"] += rejected
        row["acc_noisy"] += verify(text, edge_noise(true_img, noise_rng)).ok
        row["reject_noisy"] += not verify(text, edge_noise(bad_img, noise_rng)).ok
    total = max(n, 1)
    return {
        "n": n,
        "seed": seed,
        "size": size,
        "oracle_acc_gt": sum(r["acc_gt"] for r in per.values()) / total,
        "oracle_reject_perturbed": sum(r["reject_perturbed"] for r in per.values()) / total,
        "parse_roundtrip": roundtrip / total,
        "oracle_acc_noisy": sum(r["acc_noisy"] for r in per.values()) / total,
        "oracle_reject_noisy": sum(r["reject_noisy"] for r in per.values()) / total,
        "verifications_per_s": round(2 * n / verify_s, 1) if verify_s else None,
        "distinct_prompts": prompt_count(),
        "per_category": {c: {"n": r["n"], "oracle_acc_gt": r["acc_gt"] / max(r["n"], 1),
                             "oracle_reject_perturbed": r["reject_perturbed"] / max(r["n"], 1),
                             "oracle_acc_noisy": r["acc_noisy"] / max(r["n"], 1),
                             "oracle_reject_noisy": r["reject_noisy"] / max(r["n"], 1),
                             "distinct_prompts": prompt_count(c)} for c, r in per.items()},
    }
