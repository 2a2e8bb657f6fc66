"""Janus-Pro (transformers' JanusForConditionalGeneration) behind the model protocol, and its rollout engine."""

from model.janus.umm import JanusUMM, Settings, base_dir, is_janus_dir

__all__ = ["JanusUMM", "Settings", "base_dir", "is_janus_dir"]
