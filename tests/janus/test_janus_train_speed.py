"""The Janus backend's training speed settings (configure_training: compiled layers, chunked cross-entropy, VQ
codes kept) give the eager loss, and the posttrain worker uses them and counts MFU over the path's parameters."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

from configs.schema import PROJECT_ROOT
from model.janus import JanusUMM
from model.protocol import CPRExample

P = ["a red circle", "two blue squares left of a green triangle"]


@pytest.fixture
def fresh(tiny_recipe):
    """A tiny random Janus of its own: configure_training changes the model it is given."""
    torch.set_num_threads(1)
    m = tiny_recipe["model"]
    umm = JanusUMM.random(m["janus_config"], device="cpu", dtype="float32", settings=m["settings"])
    umm.net.train()
    return umm


def _generation() -> list[CPRExample]:
    return [CPRExample("generation", p, target_image=Image.new("RGB", (64, 64), c))
            for p, c in zip(P, ["red", "blue"])]


def _loss_and_grads(umm, exs):
    umm.net.zero_grad(set_to_none=True)
    loss = umm.kind_loss("generation", exs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in umm.net.named_parameters() if p.grad is not None}
    umm.net.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _close(a, b):
    assert torch.allclose(a[0], b[0], atol=1e-5), (a[0], b[0])
    assert a[1].keys() == b[1].keys()
    assert all(torch.allclose(a[1][k], b[1][k], atol=1e-5) for k in a[1])


def test_chunked_loss_and_kept_codes_give_the_eager_loss(fresh, monkeypatch):
    import torch.utils.checkpoint as ckpt

    exs = _generation()
    eager = _loss_and_grads(fresh, exs)
    encodes = []
    vq = fresh.net.model.vqmodel
    monkeypatch.setattr(vq, "encode", lambda *a, _e=vq.encode, **k: encodes.append(1) or _e(*a, **k))
    chunks = []
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, _c=ckpt.checkpoint, **k: chunks.append(1) or _c(*a, **k))

    speed = fresh.configure_training(compile=False, loss_chunk=7)
    assert speed == {"compile": False, "loss_chunk": 7} and fresh.train_speed is speed
    _close(_loss_and_grads(fresh, exs), eager)
    assert len(chunks) == math.ceil(len(exs) * fresh.n_image_tokens / 7)  # the head ran per 7 tokens
    assert len(encodes) == 1
    # drawn again, and without its prompt (CFG dropout): the kept codes, no VQ pass
    again = [dataclasses.replace(exs[0], input_text=""), exs[1]]
    fresh.kind_loss("generation", again)
    assert len(encodes) == 1
    assert torch.equal(fresh.image_codes([exs[1].target_image]), fresh._encode_codes([exs[1].target_image]))


def _fallbacks(caught) -> list:
    return [w for w in caught if "torch.compile of the language-model layers failed" in str(w.message)]


def _counting_compile(monkeypatch, backend):
    """torch.compile with `backend`: Dynamo traces for real, without Inductor's minutes on a CPU."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: real(fn, *a, **{**k, "backend": backend}))
    torch._dynamo.reset()


def test_compiled_layers_train_to_the_eager_loss(fresh, monkeypatch):
    exs = _generation()
    eager = _loss_and_grads(fresh, exs)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    _counting_compile(monkeypatch, backend)
    speed = fresh.configure_training(compile=True, loss_chunk=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _loss_and_grads(fresh, exs)
    assert not _fallbacks(caught)
    assert speed["compile"] is True and graphs  # the layers went through Dynamo
    _close(compiled, eager)
    fresh.configure_training(compile=False, loss_chunk=0)  # and back to eager
    n = len(graphs)
    _close(_loss_and_grads(fresh, exs), eager)
    assert len(graphs) == n and fresh.train_speed["compile"] is False


def test_a_compiler_that_fails_falls_back_to_eager_with_one_warning(fresh, monkeypatch):
    exs = _generation()
    eager = _loss_and_grads(fresh, exs)

    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    _counting_compile(monkeypatch, broken)
    fresh.configure_training(compile=True, loss_chunk=0)
    with pytest.warns(UserWarning, match="torch.compile of the language-model layers failed") as caught:
        out = _loss_and_grads(fresh, exs)
    assert len(_fallbacks(caught)) == 1
    _close(out, eager)
    assert fresh.train_speed["compile"] is False and "no C compiler here" in fresh.train_speed["compile_error"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _close(_loss_and_grads(fresh, exs), eager)  # eager from now on, silently
    assert not _fallbacks(caught)


def test_params_on_path_are_the_layers_plus_the_generation_head_for_image_tokens(fresh):
    from model.janus.bench import params_on_path

    m = fresh.net.model
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    layers = count(m.language_model) - count(m.language_model.embed_tokens)
    head = count(m.generation_aligner) + count(m.generation_head)
    assert fresh.params_on_path("caption") == fresh.params_on_path("judgement") == layers
    for kind in ("generation", "reflection", "preference", "group"):
        assert fresh.params_on_path(kind) == layers + head
    assert params_on_path(fresh) == layers + head < fresh.num_params()  # the training bench counts the same


def test_the_posttrain_worker_trains_with_them_and_counts_mfu_over_the_path(tmp_path, tiny_recipe):
    """The stage's own worker (torchrun, DeepSpeed) through the bench script, on CPU: the chunk it was given,
    compile off by default on a CPU, FLOPs = 6 x the generation path x tokens, the first steps left untimed."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts/bench_janus_posttrain.py"),
                        "--config", "configs/cycle/janus-tiny-random.yaml", "--steps", "4", "--examples", "12",
                        "--set", "posttrain.loss_chunk=7", "--set", "posttrain.ema_decay=0.9",
                        "--work", str(tmp_path / "work"), "--out", str(out)],
                       env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = json.loads(out.read_text())["posttrain"]
    assert m["speed"] == {"compile": False, "loss_chunk": 7}
    umm = JanusUMM.random(tiny_recipe["model"]["janus_config"], dtype="float32")
    path = umm.params_on_path("generation")
    assert m["flops_count"] == "params_on_path" and m["params_on_path"] == {"generation": path}
    assert m["flops_per_token"] == pytest.approx(6 * path) and path < m["params"]
    assert m["timed_steps"] == 2 and m["tokens_per_s"] > 0 and "mfu" not in m  # no MFU without a GPU peak
    assert m["tokens"] >= 4 * 4 * umm.n_image_tokens  # steps x micro-batch x image tokens, at least
    assert (tmp_path / "work" / "posttrain" / "final" / "model.safetensors").is_file()
    assert set(m["heldout_after"]) <= {"generation"}
