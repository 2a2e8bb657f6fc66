"""The embedded unified multimodal model: a tiny transformer that draws and understands ShapeWorld images.

    from model.embedded import load_embedded, EmbeddedUMM
    model = load_embedded()                       # the shipped base checkpoint (model/embedded/base)
    model = EmbeddedUMM.from_pretrained("runs/x")  # any checkpoint directory

Modules: tokenizer (image patch codebook, text vocabulary), transformer (decoder + KV cache), sequences
(token layouts of every task), umm (the protocol roles and losses), data (pretraining corpus from the
world), train (pretraining loop, no Prefect), evaluate (oracle metrics), commands (CLI).
"""

from __future__ import annotations

import os

# GNU OpenMP threads spin while waiting; on a 2-core box shared with another busy process that made decoding
# ~10x slower than one thread (5.8 vs 77 images/s measured). Passive waiting must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

from configs.loader import Strict, load_config
from model.embedded.umm import BASE_DIR, EmbeddedModelConfig, EmbeddedUMM

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model" / "embedded.yaml"


class EmbeddedBackendConfig(Strict):
    """How a pipeline loads the embedded model (configs/model/embedded.yaml)."""

    backend: str = "embedded"
    checkpoint: str = "model/embedded/base"  # relative paths: from the repository root
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    batch_size: int | None = None  # decoding batch (prompts); None: the checkpoint's default
    judge_batch: int | None = None


def load_embedded(cfg: EmbeddedBackendConfig | str | Path | None = None, overrides: list[str] | None = None
                  ) -> EmbeddedUMM:
    """Load the embedded model from a backend config (an object, a YAML path, or None for the default)."""
    import torch
    if not isinstance(cfg, EmbeddedBackendConfig):
        cfg = load_config(cfg if cfg is not None else DEFAULT_CONFIG, EmbeddedBackendConfig, overrides)
    ckpt = Path(cfg.checkpoint)
    if not ckpt.is_absolute():
        ckpt = Path(__file__).resolve().parents[2] / ckpt
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    m = EmbeddedUMM.from_pretrained(ckpt, device=cfg.device)
    upd = {k: v for k, v in (("batch_size", cfg.batch_size), ("judge_batch", cfg.judge_batch)) if v}
    if upd:
        m.config = m.config.model_copy(update={"sampling": m.config.sampling.model_copy(update=upd)})
    return m


__all__ = ["BASE_DIR", "EmbeddedBackendConfig", "EmbeddedModelConfig", "EmbeddedUMM", "load_embedded"]
