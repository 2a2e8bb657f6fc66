"""Checks of the rollout engine's Triton kernels in Triton's interpreter (CPU), run by tests/janus/test_rollout_v2.py
in a process started with TRITON_INTERPRET=1:  python tests/janus/interp_checks.py attn|sampler
Prints "ok" last when every check passed; an assertion error otherwise."""

from __future__ import annotations

import os
import sys

import torch


def _numpy2_scalars() -> None:
    """The interpreter's scalars are 1-element arrays, which numpy >= 2.3 refuses to int() (loop bounds)."""
    import triton.runtime.interpreter as TI

    orig = TI._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    TI._patch_lang_tensor = patched


def case(dtype, R=6, H=4, KVH=2, S=40, hd=32, L=12, n=29, seed=0):
    """A cache where rows 1, 2 share row 1's prefix and row 5 row 0's; rows start at different slots. The rows
    that read another's prefix hold different values in their own prefix slots (which must not be read)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, k, v, kn, vn = r(R, H, 1, hd), r(R, KVH, S, hd), r(R, KVH, S, hd), r(R, KVH, 1, hd), r(R, KVH, 1, hd)
    start = torch.tensor([0, 3, 3, 5, 11, 0], dtype=torch.int32)
    prow = torch.tensor([0, 1, 1, 3, 4, 0], dtype=torch.int32)
    return q, k, v, start, prow, torch.tensor([L], dtype=torch.int32), torch.tensor([n]), kn, vn


def check_attn() -> None:
    from model.janus import decode_attn as D

    assert D.triton is not None and D.triton.knobs.runtime.interpret
    configs = [  # (config, dtypes): the interpreter's tl.dot mishandles bf16, so the dot loop runs in fp16
        (D.Config(16, 1, 1, 1, False, False), (torch.bfloat16, torch.float32)),
        (D.Config(16, 2, 1, 1, False, True), (torch.bfloat16, torch.float32)),
        (D.Config(32, 2, 1, 3, False, True), (torch.bfloat16,)),
        (D.Config(16, 4, 2, 1, True), (torch.float16, torch.float32)),
        (D.Config(16, 4, 2, 3, True), (torch.float16,)),
    ]
    for config, dtypes in configs:
        for dt in dtypes:
            q, k, v, start, prow, plen, slot, kn, vn = case(dt)
            tol = 1e-5 if dt == torch.float32 else 2e-2  # fp32; else the output's rounding (and p's, dot loop)
            ref = D.decode_attention_v2_ref(q, k, v, start, prow, plen, slot, 0.3, kn, vn).float()
            got = D.decode_attention_v2(q, k, v, start, prow, plen, slot, 0.3, kn, vn, config=config).float()
            err = float((got - ref).abs().max())
            assert err <= tol, (tuple(config), dt, err)
            (kq, ks), (vq, vs) = D.quantize_fp8(k), D.quantize_fp8(v)
            ref8 = D.decode_attention_v2_ref(q, kq, vq, start, prow, plen, slot, 0.3, kn, vn, ks, vs).float()
            got8 = D.decode_attention_v2(q, kq, vq, start, prow, plen, slot, 0.3, kn, vn, ks, vs,
                                         config=config).float()
            err8 = float((got8 - ref8).abs().max())
            tol8 = 2e-2 if config.dot else tol  # an fp8 cache's dot loop runs in fp16 whatever q's dtype
            assert err8 <= tol8, (tuple(config), dt, "fp8", err8)
            print(tuple(config), dt, "max error", err, "fp8", err8, flush=True)
    # the cache write of a decoding step: every layer's slot in one launch, the same as index_copy_
    g = torch.Generator().manual_seed(1)
    for shape, dtype in (((3, 5, 2, 7, 32), torch.bfloat16), ((3, 5, 2, 7), torch.float32),
                         ((3, 5, 2, 7, 32), torch.uint8)):
        dst = torch.randint(0, 100, shape, generator=g).to(dtype)
        src = torch.randint(0, 100, shape[:3] + (1,) + shape[4:], generator=g).to(dtype)
        want = dst.clone().index_copy_(3, torch.tensor([4]), src)
        D.write_slot_triton(dst, src, torch.tensor([4]), 3)
        assert torch.equal(dst, want), shape
    # the case is sensitive to where the prefix is read from and where a row starts
    q, k, v, start, prow, plen, slot, kn, vn = case(torch.float32)
    got = D.decode_attention_v2(q, k, v, start, prow, plen, slot, 0.3, kn, vn, config=configs[0][0])
    own = D.decode_attention_v2_ref(q, k, v, start, torch.arange(6, dtype=torch.int32), plen, slot, 0.3, kn, vn)
    zero = D.decode_attention_v2_ref(q, k, v, torch.zeros(6, dtype=torch.int32), prow, plen, slot, 0.3, kn, vn)
    assert float((own - got).abs().max()) > 0.05 and float((zero - got).abs().max()) > 0.05


def check_sampler() -> None:
    from model.janus import sample_kernel as SK
    from model.janus.rollout import hash_uniform

    def torch_tokens(logits, seeds, scales, inv_temp, step, cfg):  # ImageRollout._choose, sampler="hash"
        x = logits.float()
        if cfg:
            B = x.shape[0] // 2
            c, u = x[:B], x[B:]
            x = u + (c - u) * scales
        x = x * inv_temp
        return (x + -torch.log(-torch.log(hash_uniform(seeds, step, x.shape[-1])))).argmax(-1)

    g = torch.Generator().manual_seed(1)
    B, V = 8, 1000  # 1000: several blocks of 256 and a partial one
    seeds = torch.tensor([0, 1, 2, 3, 2**40 + 5, 2**62 + 11, 7, 123456789], dtype=torch.int64)
    scales = torch.linspace(1.0, 8.0, B)[:, None]
    for cfg in (True, False):
        logits = (torch.randn(2 * B if cfg else B, V, generator=g) * 3).to(torch.bfloat16)
        for step, temp in ((0, 1.0), (37, 0.7), (575, 1.3)):
            st, it = torch.tensor([step]), torch.tensor(1.0 / temp)
            want = torch_tokens(logits, seeds, scales, it, st, cfg)
            got = SK.gumbel_argmax(logits, seeds, scales, it, st, cfg, block=256)
            assert torch.equal(got, want), (cfg, step, got, want)
        # and it samples: other steps draw other tokens
        assert not torch.equal(SK.gumbel_argmax(logits, seeds, scales, it, torch.tensor([1]), cfg, block=256),
                               SK.gumbel_argmax(logits, seeds, scales, it, torch.tensor([2]), cfg, block=256))
        print("sampler cfg", cfg, "equal", flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    _numpy2_scalars()
    {"attn": check_attn, "sampler": check_sampler}[sys.argv[1]]()
    print("ok", flush=True)
