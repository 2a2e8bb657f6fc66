"""A real writer process for the storage tests: builds a dataset of N parts, slowly, and logs each computed part."""

import sys
import time

import pyarrow as pa

from storage.dataset import DatasetRef, build


def main(store: str, n_parts: int, rows_per_part: int, delay: float, log_path: str) -> None:
    ref = DatasetRef(store=store, run="r1", stage="rollouts", fingerprint="ab" * 32)

    def part(i: int) -> pa.Table:
        time.sleep(delay)
        with open(log_path, "a") as fh:
            fh.write(f"{i}\n")
        start = i * rows_per_part
        return pa.table({"prompt_id": [f"p{j}" for j in range(start, start + rows_per_part)],
                         "sample_idx": list(range(start, start + rows_per_part)),
                         "image": [bytes([j % 256]) * 64 for j in range(start, start + rows_per_part)]})

    build(ref, n_parts, part, config={"n": n_parts}, upstream={}, model_id="m", code_version="1")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
