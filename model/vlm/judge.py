"""The external VLM judge: structured JSON verdicts from a vLLM engine, through one of two transports.

- `http`: an OpenAI-compatible endpoint (`vllm serve MODEL`), through the `openai` client: concurrent requests,
  a timeout each, retries with exponential backoff on transport errors, and one check before any work that the
  endpoint answers and serves the configured model.
- `inprocess`: `vllm.LLM(...).chat(...)` resident in an engine process of vLLM's own environment
  (model/vlm/engine.py), fed batches over pipes, kept for every shard this process runs.

Every answer is asked for as JSON under a schema (vLLM's structured outputs): `{"analysis", "score"}` for a verdict,
`{"answer"}` from a fixed set of choices for a question. An answer that is not valid JSON of that shape (a truncated
one, say) is kept as unparsed and counted, never dropped.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

from PIL import Image
from pydantic import Field, field_validator

from configs.loader import Strict
from model.protocol import Judgement

DEFAULT_RUBRIC = ("You judge how faithfully an image follows its text prompt. Check every object, count, colour, "
                  "position and attribute the prompt asks for, then the image's visual quality. Write a short "
                  "analysis naming what matches and what does not, then a score from 0 (nothing matches) to 10 "
                  "(everything matches and the image is clean).")


class VLMUnreachableError(RuntimeError):
    """The judge's engine cannot be reached (before work starts, or after the retries run out)."""


class VLMConfig(Strict):
    """Which external VLM judges, and how it is reached. Only `model`, `rubric` and the output bounds change what it
    says (they enter fingerprints); the transport settings change only how fast and from where."""

    model: str = Field(description="the served model name; the judge's id is 'vlm:<model>'")
    transport: Literal["http", "inprocess"] = "http"
    endpoint: str = Field("http://127.0.0.1:8000/v1", description="http: the OpenAI-compatible base URL")
    model_dir: str | None = Field(None, description="inprocess: the weights' directory (or hub id) vLLM loads")
    python: str | None = Field(None, description="inprocess: the vLLM environment's interpreter "
                               "(default: .venv-vllm/bin/python, or $SELFPLAY_VLLM_PYTHON)")
    engine_args: dict = Field(default_factory=dict, description="inprocess: more vllm.LLM(...) arguments, e.g. "
                              "{enforce_eager: false, gpu_memory_utilization: 0.5} on a GPU")
    rubric: str = DEFAULT_RUBRIC
    max_analysis_chars: int = Field(200, ge=8, le=4000)
    max_tokens: int = Field(256, ge=16, le=8192)
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(3, ge=0, le=10, description="http: retries of a request after a transport error")
    backoff_s: float = Field(1.0, ge=0, description="http: the first retry's delay; each next one doubles it")
    concurrency: int = Field(8, ge=1, le=512, description="http: requests in flight at once")

    speed_only: ClassVar[tuple[str, ...]] = ("transport", "endpoint", "model_dir", "python", "engine_args",
                                             "timeout_s", "retries", "backoff_s", "concurrency")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip() or any(c.isspace() for c in v):
            raise ValueError(f"expected a served model name without spaces, got {v!r}")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s):// base URL such as http://127.0.0.1:8000/v1, got {v!r}")
        return v.rstrip("/")

    @property
    def judge_id(self) -> str:
        return f"vlm:{self.model}"


def judgement_schema(max_chars: int) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["analysis", "score"],
            "properties": {"analysis": {"type": "string", "maxLength": max_chars},
                           "score": {"type": "integer", "minimum": 0, "maximum": 10}}}


def answer_schema(choices: tuple[str, ...]) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["answer"],
            "properties": {"answer": {"enum": list(choices)}}}


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(image: Image.Image, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": text}]}]


def parse_judgement(text: str) -> Judgement:
    """A verdict from the engine's text; anything but {"analysis": str, "score": 0-10} is unparsed (kept as raw)."""
    try:
        data = json.loads(text)
        analysis, score = data["analysis"], data["score"]
        if isinstance(analysis, str) and isinstance(score, int) and not isinstance(score, bool) and 0 <= score <= 10:
            return Judgement(reasoning=analysis, score=score, raw=text, parse_ok=True)
    except (ValueError, TypeError, KeyError):
        pass
    return Judgement(reasoning="", score=None, raw=text, parse_ok=False)


def parse_answer(text: str, choices: tuple[str, ...]) -> str | None:
    try:
        said = json.loads(text)["answer"]
    except (ValueError, TypeError, KeyError):
        return None
    return said if said in choices else None


class HTTPTransport:
    """An OpenAI-compatible endpoint: concurrent requests, each retried with backoff on transport errors."""

    def __init__(self, cfg: VLMConfig):
        from openai import OpenAI

        self.cfg = cfg
        # retries are ours (they count and back off the same way for every error we treat as transport)
        self.client = OpenAI(base_url=cfg.endpoint, api_key=os.environ.get("SELFPLAY_VLM_API_KEY", "EMPTY"),
                             timeout=cfg.timeout_s, max_retries=0)

    def check(self, start: bool = True) -> None:
        import openai

        try:
            served = [m.id for m in self.client.models.list()]
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            raise VLMUnreachableError(
                f"vlm judge: the endpoint {self.cfg.endpoint} is unreachable ({exc.__class__.__name__}); start it "
                f"with `vllm serve MODEL --served-model-name {self.cfg.model}` or set the judge's vlm.endpoint"
            ) from None
        if self.cfg.model not in served:
            raise VLMUnreachableError(f"vlm judge: the endpoint {self.cfg.endpoint} serves {served}, not "
                                      f"{self.cfg.model!r} (vlm.model)")

    def _one(self, req: dict) -> tuple[str, str]:
        import openai

        last: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                r = self.client.chat.completions.create(
                    model=self.cfg.model, messages=req["messages"], max_tokens=req["max_tokens"], temperature=0,
                    extra_body={"structured_outputs": {"json": req["schema"]}})
                choice = r.choices[0]
                return choice.message.content or "", choice.finish_reason or ""
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
                last = exc  # a transport error or an overloaded server: worth another try
            except openai.APIStatusError as exc:  # the request itself is wrong: no retry helps
                raise ValueError(f"vlm judge: {self.cfg.endpoint} refused a request ({exc.status_code}: "
                                 f"{str(exc)[:300]})") from None
        raise VLMUnreachableError(f"vlm judge: {self.cfg.endpoint} failed {self.cfg.retries + 1} times "
                                  f"({last.__class__.__name__}: {str(last)[:200]})")

    def complete(self, requests: list[dict]) -> list[tuple[str, str]]:
        if len(requests) <= 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(min(self.cfg.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))


class EngineTransport:
    """`vllm.LLM.chat` resident in an engine process of vLLM's environment, one JSON line per batch each way."""

    def __init__(self, cfg: VLMConfig):
        from model.vlm.server import vllm_env, vllm_python

        if not cfg.model_dir:
            raise ValueError("vlm.transport 'inprocess' needs vlm.model_dir: the weights vLLM loads")
        self.cfg = cfg
        self.python = cfg.python or vllm_python()
        self.env = vllm_env()
        self.proc: subprocess.Popen | None = None
        self.load_s: float | None = None
        self.lock = threading.Lock()

    def _start(self) -> None:
        from model.vlm.server import REPO_ROOT

        t0 = time.perf_counter()
        self.stderr = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"selfplay-vllm-engine-{os.getpid()}.log"),
                           "w")
        self.proc = subprocess.Popen(
            [self.python, "-m", "model.vlm.engine", "--model", self.cfg.model_dir, "--served-name", self.cfg.model,
             "--llm-kwargs", json.dumps(self.cfg.engine_args)],
            cwd=REPO_ROOT, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            self.close()
            raise VLMUnreachableError(f"vlm judge: the in-process engine did not start ({self._tail()})")
        self.load_s = time.perf_counter() - t0

    def _tail(self) -> str:
        try:
            with open(self.stderr.name) as f:
                return " | ".join(f.read().strip().splitlines()[-3:])[-400:]
        except OSError:
            return "no log"

    def check(self, start: bool = True) -> None:
        if not os.path.exists(self.python):
            raise VLMUnreachableError(f"vlm judge: no vLLM environment at {self.python}: run `make vllm`, or set "
                                      "vlm.python / $SELFPLAY_VLLM_PYTHON")
        with self.lock:
            if start and (self.proc is None or self.proc.poll() is not None):
                self._start()

    def complete(self, requests: list[dict]) -> list[tuple[str, str]]:
        self.check()
        with self.lock:
            try:
                self.proc.stdin.write(json.dumps({"requests": requests}) + "\n")
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
            except (BrokenPipeError, OSError):
                line = ""
            if not line:
                self.close()
                raise VLMUnreachableError(f"vlm judge: the in-process engine exited ({self._tail()})")
            reply = json.loads(line)
            if "error" in reply:  # the engine refused this batch and keeps serving: the request is at fault
                raise ValueError(f"vlm judge: the in-process engine refused a batch ({reply['error'][:300]})")
            return [(r["text"], r["finish_reason"]) for r in reply["results"]]

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
            self.proc = None


class VLMJudge:
    """Scores (prompt, image) pairs and answers fixed-choice questions about images, as the external VLM."""

    def __init__(self, cfg: VLMConfig):
        self.cfg = cfg
        self.judge_id = cfg.judge_id
        self.transport = HTTPTransport(cfg) if cfg.transport == "http" else EngineTransport(cfg)

    def check(self, start: bool = True) -> None:
        """Raise VLMUnreachableError unless the engine answers (before any work starts). `start=False`: an
        in-process engine is not started here, only looked for."""
        self.transport.check(start)

    def judge(self, prompts: list[str], images: list[Image.Image], rubric: Any = None) -> list[Judgement]:
        text = (f"{self.cfg.rubric}\nPrompt: {{prompt}}\nAnswer as JSON: \"analysis\" (at most "
                f"{self.cfg.max_analysis_chars} characters), then \"score\" (an integer from 0 to 10).")
        schema = judgement_schema(self.cfg.max_analysis_chars)
        reqs = [{"messages": _messages(im, text.format(prompt=p)), "schema": schema, "max_tokens": self.cfg.max_tokens}
                for p, im in zip(prompts, images)]
        return [parse_judgement(t) for t, _ in self.transport.complete(reqs)]

    def answer(self, images: list[Image.Image], questions: list[str],
               choices: list[tuple[str, ...]]) -> list[str | None]:
        """Each question answered from its image with one of its choices (None: the answer did not parse)."""
        reqs = [{"messages": _messages(im, f"{q}\nAnswer as JSON with \"answer\", one of: {', '.join(c)}."),
                 "schema": answer_schema(c), "max_tokens": 32} for im, q, c in zip(images, questions, choices)]
        return [parse_answer(t, c) for (t, _), c in zip(self.transport.complete(reqs), choices)]


_RESIDENT: dict[str, VLMJudge] = {}


def make_vlm(cfg: VLMConfig) -> VLMJudge:
    """The judge for this config, resident in this process (an in-process engine loads once per worker)."""
    key = cfg.model_dump_json()
    if key not in _RESIDENT:
        _RESIDENT[key] = VLMJudge(cfg)
    return _RESIDENT[key]
