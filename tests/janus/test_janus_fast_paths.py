"""The rollout engine's fp8 KV cache and decode-attention reference, and the chunked image cross-entropy (CPU, fp32).
The Triton kernel itself needs a GPU: scripts/bench_janus_attn.py checks it against `decode_attention_ref`."""

import torch
import torch.nn.functional as F

from model.janus.decode_attn import decode_attention_ref, dequantize_fp8, quantize_fp8
from model.janus.rollout import ImageRollout

P = ["a red circle", "two blue squares on the left of a green star"]


def test_fp8_quantization_keeps_each_vector_to_fp8_precision():
    x = torch.randn(3, 2, 5, 64) * torch.logspace(-3, 2, 5)[None, None, :, None]
    q, s = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == x.shape[:-1]
    err = (dequantize_fp8(q, s, torch.float32) - x).abs() / x.abs().amax(-1, keepdim=True)
    assert float(err.max()) <= 2**-4  # e4m3: 3 mantissa bits, scaled to each vector's amax


def test_decode_attention_ref_is_masked_attention_over_cache_and_fresh_key():
    torch.manual_seed(0)
    R, H, S, hd, slot = 2, 4, 9, 16, 6
    q, k, v = torch.randn(R, H, 1, hd), torch.randn(R, H, S, hd), torch.randn(R, H, S, hd)
    mask = torch.rand(R, S) > 0.3
    kn, vn = torch.randn(R, H, 1, hd), torch.randn(R, H, 1, hd)
    got = decode_attention_ref(q, k, v, mask, slot, 0.25, kn, vn)
    kk, vv = torch.cat([k[:, :, :slot], kn], 2), torch.cat([v[:, :, :slot], vn], 2)
    m = torch.cat([mask[:, :slot], torch.ones(R, 1, dtype=torch.bool)], 1)[:, None, None]
    assert torch.allclose(got, F.scaled_dot_product_attention(q, kk, vv, attn_mask=m, scale=0.25), atol=1e-5)


def test_fp8_kv_cache_engine_is_seeded_and_batch_invariant(tiny):
    eng = ImageRollout(tiny.net, kv_cache="fp8")
    cond = [tiny._gen_prefix(p) for p in P]
    unc = [tiny._gen_prefix(p, uncond=True) for p in P]
    a = eng.sample(cond, unc, [1, 2], [3.0, 5.0])
    b = eng.sample(cond[1:], unc[1:], [2], [5.0])
    assert eng._state.k[0].dtype == torch.float8_e4m3fn
    assert torch.equal(a[1], b[0])
    assert torch.equal(a, eng.sample(cond, unc, [1, 2], [3.0, 5.0]))


def test_chunked_image_ce_equals_whole(tiny):
    torch.manual_seed(0)
    prefixes = [tiny._gen_prefix(p).detach() for p in P]
    codes = torch.randint(0, tiny.net.config.vq_config.num_embeddings, (2, tiny.n_image_tokens))
    head = tiny.net.model.generation_head
    losses, grads = [], []
    for chunk in (0, 7):
        tiny.net.zero_grad()
        loss = tiny.image_ce(prefixes, codes, chunk)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in head.parameters()])
    tiny.net.zero_grad()
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_padding_leaves_each_examples_loss_as_alone(tiny, monkeypatch):
    """Training batches are right-padded with no attention mask (to a multiple of 16 on a GPU, forced here): an
    example's loss in a batch of other lengths is its loss alone, for image codes and for text answers."""
    from PIL import Image

    import model.janus.umm as U

    monkeypatch.setattr(U, "train_length", lambda n, device: -(-n // 16) * 16 + 16)
    torch.manual_seed(0)
    prefixes = [tiny._gen_prefix(p).detach() for p in P]
    assert prefixes[0].shape[0] != prefixes[1].shape[0]
    codes = torch.randint(0, tiny.net.config.vq_config.num_embeddings, (2, tiny.n_image_tokens))
    questions = [tiny.und_ids("what is it?", " "), tiny.und_ids("how many red circles are there in the picture?", " ")]
    answers = [tiny.encode("a red circle and a long answer"), tiny.encode("three")]
    images = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (64, 64), (10, 10, 200))]
    with torch.no_grad():
        both = tiny.image_ce(prefixes, codes)
        alone = [tiny.image_ce([p], c[None]) for p, c in zip(prefixes, codes)]
        assert torch.allclose(both, (alone[0] + alone[1]) / 2, atol=1e-5)
        both = tiny.text_ce(questions, answers, images)
        alone = [tiny.text_ce([q], [a], [im]) for q, a, im in zip(questions, answers, images)]
        n = [len(a) + 1 for a in answers]  # each answer and its EOS
        assert torch.allclose(both, (alone[0] * n[0] + alone[1] * n[1]) / sum(n), atol=1e-5)
