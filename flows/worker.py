"""The Dask worker plugin of `run.cluster`. It imports nothing of this project at module level: a worker puts its
scratch folder first on sys.path, and that folder holds a `storage` spill directory that would shadow this
project's `storage` package, so the path is repaired before anything of ours is unpickled."""

from __future__ import annotations

import os
import sys
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin


class ShardWorker(WorkerPlugin):
    """Prepares a worker before its first shard: the import path, one resident model, its torch threads, and on a
    machine without dask-cuda the GPU whose index is the worker's name."""

    name = "selfplay-shard-worker"

    def __init__(self, threads: int, gpus: int, api_url: str | None = None):
        self.threads, self.gpus, self.api_url = threads, gpus, api_url

    def setup(self, worker: Any) -> None:
        scratch = os.path.abspath(worker.local_directory)
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != scratch]
        for name in [m for m in sys.modules if m == "storage" or m.startswith("storage.")]:
            if getattr(sys.modules[name], "__file__", None) is None:  # the spill folder, imported as a namespace
                del sys.modules[name]
        if self.api_url:  # task runs on the workers report to the flow's Prefect server, not one of their own
            os.environ.setdefault("PREFECT_API_URL", self.api_url)
        os.environ["SELFPLAY_RESIDENT_MODELS"] = "1"
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # before torch loads here
            os.environ[var] = str(self.threads)
        if self.gpus and "CUDA_VISIBLE_DEVICES" not in os.environ:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(int(worker.name) % self.gpus)
        import torch

        torch.set_num_threads(self.threads)
