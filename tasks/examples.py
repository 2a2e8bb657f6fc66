"""The training-example table: what reconstruct (and the ground-truth reference) write and posttrain reads.

One row per example of a CPR kind, a DPO pair ('preference') or a scored group sample ('group'), with its
lineage (prompt_id and the sample ids it came from) and a held-out split by prompt.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from configs.schema import ReconstructConfig
from tasks.stage import prompt_id, stable_seed

EXAMPLES = pa.schema([("example_id", pa.string()), ("kind", pa.string()), ("split", pa.string()),
                      ("prompt_id", pa.string()), ("sample_ids", pa.list_(pa.int32())), ("input_text", pa.string()),
                      ("input_image", pa.binary()), ("target_text", pa.string()), ("target_image", pa.binary()),
                      ("rejected_image", pa.binary()), ("meta", pa.string())])


def split_of(pid: str, cfg: ReconstructConfig) -> str:
    """'heldout' for a stable `heldout_share` of prompts (for held-out loss), else 'train'."""
    return "heldout" if stable_seed(cfg.seed, "split", pid) % 10_000 < cfg.heldout_share * 10_000 else "train"


def example_row(cfg: ReconstructConfig, kind: str, pid: str, samples: list[int], prompt: dict[str, Any],
                input_text: str | None = None, input_image: bytes | None = None, target_text: str | None = None,
                target_image: bytes | None = None, rejected_image: bytes | None = None, **meta: Any) -> dict[str, Any]:
    """One row of EXAMPLES; `prompt` is the prompts row (its text and category go into meta)."""
    key = f"{kind}:{pid}:{samples}:{input_text}"
    return {"example_id": prompt_id(key), "kind": kind, "split": split_of(pid, cfg), "prompt_id": pid,
            "sample_ids": list(samples), "input_text": input_text, "input_image": input_image,
            "target_text": target_text, "target_image": target_image, "rejected_image": rejected_image,
            "meta": json.dumps({"prompt": prompt["prompt"], "category": prompt["category"], **meta})}
