"""A resident vLLM engine fed over pipes: the in-process transport's worker. Runs in vLLM's environment:

    .venv-vllm/bin/python -m model.vlm.engine --model DIR [--served-name NAME] [--llm-kwargs JSON]

Protocol, one JSON object per line. Once loaded it writes `{"ready": true, "load_s": S, "model": NAME}`. Then for
each line read from stdin, `{"requests": [{"messages": [...], "schema": {...} | null, "max_tokens": N}, ...]}`
(OpenAI-style chat messages; images as `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`),
it writes `{"results": [{"text": str, "finish_reason": str}, ...]}` in the same order, or `{"error": str}` when
the batch could not run (the engine stays up). It exits with 0 at end of input.

stdout carries only those lines: file descriptor 1 is pointed at stderr before vLLM is imported, so vLLM's logs,
progress bars and anything its native code prints land on stderr, and the protocol writes to a private copy of
the original stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from model.vlm.server import ENGINE_ENV, STRUCTURED_OUTPUTS_CONFIG


def _protocol_stdout():
    """Keep the real stdout for the protocol; send fd 1 and sys.stdout to stderr for everything else."""
    sys.stdout.flush()
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def _reply(out, obj: dict) -> None:
    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.vlm.engine")
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--served-name", default=None, help="the model's name in the ready line (default: the dir)")
    ap.add_argument("--llm-kwargs", default="{}", help="JSON object of extra vllm.LLM(...) arguments")
    args = ap.parse_args(argv)

    proto = _protocol_stdout()
    for key, value in ENGINE_ENV.items():  # before vllm reads them at import
        os.environ.setdefault(key, value)

    t0 = time.monotonic()
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kwargs = dict(
        model=args.model,
        served_model_name=args.served_name,
        # eager, one process: the fastest start; the judge's prompts are short, so graphs would buy little
        enforce_eager=True,
        distributed_executor_backend="uni",
        limit_mm_per_prompt={"image": 1, "video": 0},
        structured_outputs_config=dict(STRUCTURED_OUTPUTS_CONFIG),
    )
    kwargs.update(json.loads(args.llm_kwargs))
    llm = LLM(**kwargs)
    _reply(proto, {"ready": True, "load_s": round(time.monotonic() - t0, 3),
                   "model": args.served_name or args.model})

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            requests = json.loads(line)["requests"]
            conversations = [r["messages"] for r in requests]
            params = [
                SamplingParams(
                    temperature=0.0,
                    max_tokens=int(r.get("max_tokens") or 256),
                    structured_outputs=StructuredOutputsParams(json=r["schema"]) if r.get("schema") else None,
                )
                for r in requests
            ]
            outputs = llm.chat(conversations, params, use_tqdm=False) if requests else []
            results = [{"text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason} for o in outputs]
        except Exception as e:  # a bad batch is answered, not fatal: the caller decides what it costs
            _reply(proto, {"error": f"{type(e).__name__}: {e}"})
            continue
        _reply(proto, {"results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
