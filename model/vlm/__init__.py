"""An external VLM served by vLLM: a judge (`judge_id` 'vlm:<model>') and the real-model benchmark's evaluator.

vLLM's pins conflict with the project's, so vLLM lives in its own environment (`.venv-vllm`, `make vllm`). The main
environment reaches it either over HTTP (an OpenAI-compatible `vllm serve` endpoint) or through a resident engine
process of that environment fed over pipes (`vllm.LLM.chat` in-process there). Nothing here imports vllm.
"""

from model.vlm.judge import VLMConfig, VLMJudge, VLMUnreachableError, make_vlm

__all__ = ["VLMConfig", "VLMJudge", "VLMUnreachableError", "make_vlm"]
