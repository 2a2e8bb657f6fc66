"""Janus-Pro (transformers' JanusForConditionalGeneration) behind the model protocol, and its rollout engine.

Names are imported on first use: registering the backend must not load torch and transformers.
"""

__all__ = ["JanusUMM", "Settings", "is_janus_dir"]


def __getattr__(name: str):
    if name in __all__:
        from model.janus import umm

        return getattr(umm, name)
    raise AttributeError(f"module 'model.janus' has no attribute {name!r}")
