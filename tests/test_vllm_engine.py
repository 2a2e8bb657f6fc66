"""The vLLM infrastructure itself: the tiny random Qwen2-VL builds, `VLLMServer` serves it over the OpenAI API and
`model.vlm.engine` answers over its pipes, both with JSON held to a schema. Random weights say random things: only
the shape of the answers is checked."""

import base64
import io
import json
import os
import subprocess
import time

import pytest
from PIL import Image

from model.vlm.server import REPO_ROOT, VLLMServer, ensure_tiny_model, vllm_env, vllm_python

NAME = "tiny-qwen2-vl-infra"
SCHEMA = {
    "type": "object",
    "properties": {
        # bounded: a random model would otherwise write to max_tokens and leave the JSON unclosed
        "analysis": {"type": "string", "pattern": "^[a-z ,.]{0,200}$"},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
    },
    "required": ["analysis", "score"],
    "additionalProperties": False,
}
N = 10

def _data_url(i: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48 + 8 * (i % 3), 64), ((53 * i) % 256, (97 * i) % 256, (31 * i) % 256)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(i)}},
        {"type": "text", "text": f"Prompt {i}: a red circle left of a blue square. Rate the image from 0 to 10."},
    ]}]


def _score(text: str) -> int:
    verdict = json.loads(text)
    assert set(verdict) == {"analysis", "score"} and isinstance(verdict["analysis"], str)
    assert isinstance(verdict["score"], int) and 0 <= verdict["score"] <= 10
    return verdict["score"]


def _alive(group: int, within_s: float) -> bool:
    """Whether process group `group` still has a process after within_s (zombies are reaped by init meanwhile)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = ensure_tiny_model(tmp_path_factory.mktemp("vllm-infra") / NAME)
    assert ensure_tiny_model(out) == out  # built once: the second call finds it complete
    return out


def test_server_answers_schema_json_with_an_image(tiny_dir):
    from openai import OpenAI

    with VLLMServer(tiny_dir, served_name=NAME) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.pid
        client = OpenAI(base_url=server.url, api_key="unused", timeout=60)
        for i in range(N):
            r = client.chat.completions.create(model=NAME, messages=_messages(i), max_tokens=160, temperature=0,
                                               extra_body={"structured_outputs": {"json": SCHEMA}})
            assert r.choices[0].finish_reason == "stop"
            _score(r.choices[0].message.content)
        group = server.pid
    assert not _alive(group, within_s=10)  # stopped with its whole process group (engine core, resource tracker)


def test_engine_answers_batches_over_its_pipes(tiny_dir):
    proc = subprocess.Popen(
        [vllm_python(), "-m", "model.vlm.engine", "--model", str(tiny_dir), "--served-name", NAME],
        cwd=REPO_ROOT, env=vllm_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        ready = json.loads(proc.stdout.readline())  # stdout carries protocol lines only, from the first line
        assert ready["ready"] is True and ready["load_s"] > 0

        def ask(requests: list[dict]) -> dict:
            proc.stdin.write(json.dumps({"requests": requests}) + "\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())

        requests = [{"messages": _messages(i), "schema": SCHEMA, "max_tokens": 160} for i in range(N)]
        results = ask(requests[:1])["results"] + ask(requests[1:])["results"]
        assert len(results) == N and all(r["finish_reason"] == "stop" for r in results)
        for r in results:
            _score(r["text"])
        assert "error" in ask([{"messages": "not a conversation"}])  # a bad batch is answered; the engine lives on
        assert len(ask(requests[:2])["results"]) == 2
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0  # clean exit at end of input
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_server_that_cannot_start_says_why(tmp_path):
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code"):
        VLLMServer(tmp_path / "no-such-model", served_name=NAME, log_path=tmp_path / "server.log").start(timeout_s=120)
    assert time.monotonic() - t < 120
