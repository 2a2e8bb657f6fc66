"""`selfplay bench storage`: how fast the artifact store writes, verifies and reads image datasets."""

from __future__ import annotations

import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
from PIL import Image

from storage.dataset import DatasetRef, build, fingerprint
from storage.images import from_png, to_png


def bench_storage(rows: int = 20_000, parts: int = 20, size: int = 32) -> dict:
    rng = np.random.default_rng(0)
    # blocky images like the embedded world's: flat colours compress like real rollouts do
    tiles = [to_png(Image.fromarray(np.kron(rng.integers(0, 4, (size // 8, size // 8, 3)) * 80,
                                            np.ones((8, 8, 1))).astype(np.uint8))) for _ in range(64)]
    per_part = rows // parts
    root = tempfile.mkdtemp(prefix="bench-store-")
    try:
        ref = DatasetRef(store=root, run="bench", stage="rollouts",
                         fingerprint=fingerprint("rollouts", {"rows": rows}, {}, None, "bench"))

        def part(i: int) -> pa.Table:
            idx = np.arange(i * per_part, (i + 1) * per_part)
            return pa.table({"prompt_id": [f"p{j // 8:08d}" for j in idx], "sample_idx": idx % 8,
                             "image": pa.array([tiles[j % 64] for j in idx], pa.binary())})

        t0 = time.perf_counter()
        res = build(ref, parts, part, config={"rows": rows}, upstream={}, model_id=None, code_version="bench",
                    log=lambda _: None)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        table = ref.open().read()
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        images = [from_png(b) for b in table.column("image").to_pylist()[:2000]]
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = build(ref, parts, part, config={"rows": rows}, upstream={}, model_id=None, code_version="bench")
        reuse_s = time.perf_counter() - t0
        nbytes = sum(p.bytes for p in res.manifest.parts)
        return {"rows": rows, "parts": parts, "bytes": nbytes, "write_rows_per_s": round(rows / write_s),
                "read_verify_rows_per_s": round(rows / read_s), "png_decode_per_s": round(len(images) / decode_s),
                "reuse_check_s": round(reuse_s, 4), "reused": again.reused}
    finally:
        shutil.rmtree(root, ignore_errors=True)
