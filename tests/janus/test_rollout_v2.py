"""The rollout engine's v2 step (model/janus/rollout.py `impl="v2"`): its Triton kernels run in Triton's interpreter
on CPU against torch references and are compiled for Hopper (sm_90) offline; the engine itself runs on CPU (fp32,
the reference attention) against v1; teacher forcing is checked on both.

The kernel tests need the `triton` package (GPU installs have it; on CPU: `pip install triton`) and skip without it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interp_checks import case  # the cache layout the interpreter checks use too

from model.janus import decode_attn as D
from model.janus.rollout import ImageRollout

ROOT = Path(__file__).resolve().parents[2]
P = ["a red circle", "two blue squares on the left of a green star", "a red circle", "x"]


def _interpreted(check: str) -> None:
    """Run `check` of tests/janus/interp_checks.py in a fresh process with TRITON_INTERPRET=1 (Triton reads it when
    triton.language is first imported, so it cannot be switched on in this process)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("interp_checks.py")), check], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ok" in r.stdout.splitlines()[-1]


def test_v2_kernel_equals_reference_in_interpreter():
    """Every loop (fp32 registers, with and without prefetch; tensor cores), split and not, bf16/fp16/fp32, over a
    bf16 and an fp8 cache, against decode_attention_v2_ref (tests/janus/interp_checks.py `attn`)."""
    _interpreted("attn")


def test_v2_reference_is_v1_reference_over_shared_rows():
    """Where every row reads its own prefix and starts at its first unmasked slot, v2's attention is v1's."""
    q, k, v, start, _, plen, slot, kn, vn = case(torch.float32)
    own = torch.arange(6, dtype=torch.int32)
    mask = torch.arange(k.shape[2])[None, :] >= start[:, None].long()
    a = D.decode_attention_v2_ref(q, k, v, start, own, plen, slot, 0.3, kn, vn)
    assert torch.allclose(a, D.decode_attention_ref(q, k, v, mask, int(slot), 0.3, kn, vn), atol=1e-6)


def test_gumbel_kernel_equals_torch_sampler_in_interpreter():
    """The Triton sampler's tokens equal the engine's torch hash sampler's, with and without CFG, several steps and
    temperatures, 64-bit seeds (tests/janus/interp_checks.py `sampler`)."""
    _interpreted("sampler")


def _compile_sm90(fn, types: dict, constexprs: dict, warps: int, stages: int, **options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: types.get(n, "constexpr" if n in constexprs else "i32") for n in fn.arg_names}
    # what Triton's launcher infers for 16-aligned pointers and strides (the vectorised loads depend on it)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if sig[n].startswith("*") or (sig[n] == "i32" and n.startswith("s") and not n.startswith("ss"))}
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages, **options})


def test_kernels_compile_for_hopper():
    """Compile (to a cubin, with the ptxas Triton ships) what the bench launches on an H200: GPU runs are expensive,
    a type or resource error is found here."""
    pytest.importorskip("triton")
    if D.triton is None:
        pytest.skip("model.janus.decode_attn was imported without Triton")
    from model.janus import sample_kernel as SK

    for fp8 in (False, True):
        et = "*fp8e4nv" if fp8 else "*bf16"
        types = {"Q": "*bf16", "K": et, "V": et, "KS": "*fp32" if fp8 else "*bf16", "VS": "*fp32" if fp8 else "*bf16",
                 "START": "*i32", "PROW": "*i32", "PLEN": "*i32", "SLOT": "*i64", "KN": "*bf16", "VN": "*bf16",
                 "O": "*bf16", "PM": "*fp32", "PL": "*fp32", "PACC": "*fp32", "qk_scale": "fp32"}
        for c in (D.Config(32, 1, 2, 1, False, False), D.Config(64, 4, 2, 1, False, True),
                  D.Config(64, 4, 3, 4, True), D.default_config(512 * 16, fp8)):
            cons = {"GROUP": 1, "HD": 128, "BLOCK_N": c.block_n, "SPLITS": c.splits, "IS_FP8": fp8, "DOT": c.dot,
                    "PREFETCH": c.prefetch}
            k = _compile_sm90(D._decode_v2_kernel, types, cons, c.warps, c.stages)
            assert k.asm["cubin"] and k.metadata.shared <= 227 * 1024
            if c.dot:  # the point of the dot loop: K/V loads pipelined through shared memory
                assert "cp.async" in k.asm["ptx"]
    types = {"Q": "*bf16", "KN": "*bf16", "VN": "*bf16", "PM": "*fp32", "PL": "*fp32", "PACC": "*fp32", "O": "*bf16",
             "qk_scale": "fp32"}
    assert _compile_sm90(D._combine_kernel, types, {"GROUP": 1, "HD": 128, "SPLITS": 4}, 1, 1).asm["cubin"]
    for et, d in (("*bf16", 128), ("*u8", 128), ("*fp32", 1)):
        types = {"DST": et, "SRC": et, "SLOT": "*i64", "total": "i64", "S": "i32"}
        assert _compile_sm90(D._write_slot_kernel, types, {"D": d, "BLOCK": 2048}, 4, 1).asm["cubin"]
    types = {"LOGITS": "*bf16", "SEEDS": "*i64", "SCALES": "*fp32", "INV_T": "*fp32", "STEP": "*i64", "OUT": "*i64"}
    assert _compile_sm90(SK._gumbel_argmax_kernel, types, {"CFG": True, "BLOCK": 2048}, 8, 1,
                         enable_fp_fusion=False).asm["cubin"]


def test_torch_compile_sees_only_the_output_written():
    """torch.compile reads a user kernel's stores to know what it mutates; were the cache among them, each compiled
    step would copy the whole cache. The v2 kernel writes its output (or the split buffers) only."""
    pytest.importorskip("triton")
    W = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
    if D.triton is None or not hasattr(W, "identify_accessed_tensors"):
        pytest.skip("no Triton, or this torch analyses kernels otherwise")
    import importlib

    from triton.backends.compiler import GPUTarget

    drv = importlib.import_module("triton.runtime.driver").driver

    class Hopper:  # the analysis asks the active driver for its target; there is no GPU here
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    R, H, S, hd = 4, 2, 32, 128
    z = lambda *s, dt=torch.bfloat16: torch.zeros(*s, dtype=dt)  # noqa: E731
    prev = drv._active  # reset_active() would build the default driver, which needs a GPU
    drv.set_active(Hopper())
    try:
        for fp8 in (False, True):
            for c in (D.Config(64, 4, 3, 1, True), D.Config(32, 1, 1, 2, False, True)):
                kd = torch.float8_e4m3fn if fp8 else torch.bfloat16
                sc = z(R, H, S, dt=torch.float32) if fp8 else z(1)
                kw = dict(Q=z(R, H, 1, hd), K=z(R, H, S, hd, dt=kd), V=z(R, H, S, hd, dt=kd), KS=sc, VS=sc,
                          START=z(R, dt=torch.int32), PROW=z(R, dt=torch.int32), PLEN=z(1, dt=torch.int32),
                          SLOT=z(1, dt=torch.int64), KN=z(R, H, 1, hd), VN=z(R, H, 1, hd), O=z(R, H, 1, hd),
                          PM=z(8, dt=torch.float32), PL=z(8, dt=torch.float32), PACC=z(8, dt=torch.float32),
                          qk_scale=0.1, sq_r=256, sq_h=128, sk_r=8192, sk_h=4096, sk_s=128, ss_r=64, ss_h=32,
                          skn_r=256, skn_h=128, svn_r=256, svn_h=128, so_r=256, so_h=128, GROUP=1, HD=hd,
                          BLOCK_N=c.block_n, SPLITS=c.splits, IS_FP8=fp8, DOT=c.dot, PREFETCH=c.prefetch)
                acc = W.identify_accessed_tensors(D._decode_v2_kernel, kw, {})
                writes = {d.name for d in acc.read_writes.writes}
                assert writes == ({"O"} if c.splits == 1 else {"PM", "PL", "PACC"}), (fp8, c, writes)
                assert {"K", "V"} <= {d.name for d in acc.read_writes.reads}
    finally:
        drv._active = prev


# ---------------------------------------------------------------------- the engine (CPU, fp32)
def _rows(tiny):
    return [tiny._gen_prefix(p) for p in P], [tiny._gen_prefix(p, uncond=True) for p in P]


def test_engine_v2_equals_v1_on_cpu(tiny):
    """v2 (shared prefixes prefilled once, padding skipped, fused projections, stacked cache writes) gives v1's
    tokens, and v1's logits over v1's tokens (teacher forced) to fp32 rounding."""
    cond, unc = _rows(tiny)
    seeds, scales = [1, 2, 3, 4], [3.0, 5.0, 5.0, 2.0]
    v1, v2 = ImageRollout(tiny.net, impl="v1"), ImageRollout(tiny.net, impl="v2")
    a = v1.sample(cond, unc, seeds, scales, capture=4)
    la = v1.captured_logits
    b = v2.sample(cond, unc, seeds, scales, force=a, capture=4)
    assert torch.equal(a, b)
    assert float((la - v2.captured_logits).abs().max()) < 1e-4
    st = v2._state
    # prompt 2 repeats prompt 0: its rows (2 and its unconditional row 6) read rows 0 and 4's prefix
    assert st.prow.tolist()[:4] == [0, 1, 0, 3] and st.prow[6] == 4 and st.prow[5] == 5
    lens = [len(tiny.gen_ids(p)) for p in P]
    assert st.start.tolist() == [st.L - n for n in lens] * 2
    assert torch.equal(v2.sample(cond, unc, seeds, scales), a)  # free running, again: the same tokens


def test_engine_v2_prefix_sharing_changes_nothing_but_reads(tiny):
    cond, unc = _rows(tiny)
    shared = ImageRollout(tiny.net, impl="v2").sample(cond, unc, [5, 6, 7, 8], [4.0] * 4, capture=2)
    own_eng = ImageRollout(tiny.net, impl="v2", share_prefix=False)
    own = own_eng.sample(cond, unc, [5, 6, 7, 8], [4.0] * 4)
    assert own_eng._state.prow.tolist() == list(range(8))
    assert torch.equal(shared, own)


def test_teacher_forcing_captures_each_steps_logits(tiny):
    """Greedy: each token is the argmax of its step's guided logits, so the capture is aligned to the steps; forced
    with other tokens, the engine's logits follow the forced history (not its own samples)."""
    cond, unc = _rows(tiny)
    for impl in ("v1", "v2"):
        eng = ImageRollout(tiny.net, impl=impl)
        toks = eng.sample(cond, unc, [1, 2, 3, 4], [5.0] * 4, temperature=0, capture=3)
        assert torch.equal(eng.captured_logits.argmax(-1), toks[:3])
        other = torch.randint(0, tiny.net.config.vq_config.num_embeddings, toks.shape,
                              generator=torch.Generator().manual_seed(0))
        again = eng.sample(cond, unc, [1, 2, 3, 4], [5.0] * 4, temperature=0, force=other, capture=3)
        assert torch.equal(eng.captured_logits.argmax(-1), again[:3])
        assert not torch.equal(again, toks)  # the sampled tokens depend on the forced history


def test_prefix_groups_finds_equal_rows():
    x = torch.randn(5, 3, 4)
    x[3] = x[1]
    x[4] = x[1]
    keym = torch.ones(5, 3, dtype=torch.bool)
    keym[4, 0] = False  # same values, shorter prefix: not the same row
    assert ImageRollout.prefix_groups(x, keym).tolist() == [0, 1, 2, 1, 4]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_rollout_bench_on_cpu(tmp_path):
    """The issue-20 bench end to end on the tiny shape: v1 and v2 timed, teacher-forced fidelity (fp32 on CPU: v2
    matches v1's logits), the eager-vs-compiled calibration, the per-kernel profile, generate, and the JSON."""
    import json

    from model.janus import rollout_bench

    out = tmp_path / "r.json"
    res = rollout_bench.main(["configs/cycle/janus-tiny-random.yaml", "--prompts", "2", "--samples", "2", "--batch",
                              "4", "--engines", "v1,v2", "--fidelity", "2", "--calibrate", "--profile", "--generate",
                              "--out", str(out)])
    assert json.loads(out.read_text())["engines"].keys() == {"v1", "v2"}
    assert not [s for s, v in res["stages"].items() if "error" in v]
    v1, v2 = res["engines"]["v1"], res["engines"]["v2"]
    assert v1["same_seed_same_tokens"] and v2["same_seed_same_tokens"]
    assert v1["teacher_forced_own_tokens_reproduced"] and v2["token_match_vs_first_engine"] == 1.0
    fid = v2["fidelity"]
    assert fid["steps"] == 16 and fid["top1_agreement"] == 1.0 and abs(fid["kl_max"]) < 1e-6
    assert v2["no_prefix_sharing"]["same_tokens_as_shared"]
    # 2 prompts x 2 samples, conditional and unconditional: 4 distinct prefixes among 8 rows
    assert res["distinct_prefixes"] == 4
    sl = res["slots_per_step_per_layer_head"]
    assert sl["v2_unique"] < sl["v2_requested"] < sl["v1"]
    assert v1["profile"]["kernels"] and v1["profile"]["gpu_us_per_step"] > 0
    assert res["generate"]["images"] == 4
