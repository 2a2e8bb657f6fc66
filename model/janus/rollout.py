"""A fast image-token rollout engine for transformers' JanusForConditionalGeneration.

What transformers' `generate(generation_mode="image")` does per decoding step (22 ms at any batch on an H200:
overhead-bound), this engine does with:
- the conditional and unconditional rows of classifier-free guidance in one batch (cond rows first), each row
  with its own guidance scale;
- a static KV cache of its own (one tensor pair per layer), written in place at a slot index held in a tensor;
- the decoding step (image-token embedding -> Llama layers -> generation head -> CFG -> sampling -> cache and
  counters advanced) captured once into CUDA graphs on GPU and replayed 575 times;
- decode attention (`attn`): "triton" (default where Triton and a GPU are there: model/janus/decode_attn.py, one
  kernel that streams the cache once per (row, head) up to the current slot, deterministic, one graph for every
  step), "matmul" (the CPU default: batched GEMVs over the cache up to the current length rounded up to `bucket`
  slots, one graph per bucket, all sharing one memory pool) or "sdpa" (not run-to-run deterministic on an H100);
- `kv_cache="fp8"` (opt-in): K and V stored as float8_e4m3fn with a scale per (row, head, slot), half the bytes
  read per step; it changes some sampled tokens (the bench measures how many), so the default is the model's dtype;
- the model's own modules and weights (no copy): the engine reads the HF Llama layers' projections, norms and
  rotary embedding, so it computes what the model computes;
- `impl="v2"` (the default; `JANUS_ROLLOUT_IMPL=v1` or `impl="v1"` gives the step as it was before, which the
  bench runs beside it): the same step with less read and fewer kernels. On an H200 (1B shape, 256 images, CFG 5)
  40.6-42.8 images/s over four machines against v1's 28.2-28.3, the same tokens run to run, and teacher-forced
  logits closer to v1's than v1 compiled is to v1 eager (docs/janus.md). Each distinct prefix is prefilled once and
  the rows that share it read it from one cache row (the samples of a prompt; unconditional rows of one length),
  rows skip their left padding, decode attention is `decode_attn.decode_attention_v2` (split along the sequence
  where rows x heads are few), the q/k/v and gate/up projections run as one matrix product each (concatenated
  copies of the weights, refreshed from the model at every `sample` call), the generation head joins the compiled
  step, the cache is written with one copy per tensor for all layers (one Triton launch each:
  `decode_attn.write_slot`), and the hash sampler is one Triton kernel (model/janus/sample_kernel.py). Without
  Triton or a GPU it runs the same step with `decode_attention_v2_ref` (the CPU tests compare it with v1).

Teacher forcing (`sample(force=tokens, capture=n)`): each step is fed the given token instead of the sampled one and
the guided logits of the first n samples are kept (`captured_logits`, (n, n_tokens, V) fp32): the bench compares
engines on the same token sequence with it (KL divergence, top-1 agreement).

Sampling noise, per sample (the same seed gives the same image whatever else is in the batch):
- `sampler="hash"` (default, graph-friendly): a counter-based hash of (seed, step, code) gives a uniform per code,
  the token is argmax(logits / T + Gumbel) (= sampling from softmax(logits / T)). Integer-only, so the noise is the
  same on every device.
- `sampler="torch"`: per sample a `torch.Generator` seeded with the seed draws Exp(1) noise of one row per step and
  the token is argmax(probs / noise) - exactly what `torch.multinomial(probs, 1)` does with the global generator
  inside transformers' `generate`. With it, a batch of prompts gives the same tokens as `generate` run on each
  prompt alone after `torch.manual_seed(seed)` (tests/janus check this on CPU in fp32; on GPU in bf16 the batched
  matrix products round differently from generate's, so tokens agree until the first near-tie, see the bench).
  It runs eagerly (one draw per row per step), so it is the slow path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.janus import decode_attn, sample_kernel

_M64 = (1 << 64)


def _s64(x: int) -> int:
    x &= _M64 - 1
    return x - _M64 if x >= 1 << 63 else x


_C1, _C2, _C3 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def hash_uniform(seeds: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) uniforms in (0, 1) from splitmix64 over (seed, step, index): integer-only, device-independent."""
    idx = torch.arange(n, device=seeds.device, dtype=torch.int64)
    z = seeds.to(torch.int64)[:, None] * _C1 + (step.to(torch.int64) + 1) * _C2 + idx[None, :] * _C3
    z = (z ^ _shr(z, 30)) * _C2
    z = (z ^ _shr(z, 27)) * _C3
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass
class _State:
    key: tuple
    R: int  # rows (2B with CFG)
    B: int
    L: int  # prefix slots
    S: int  # cache slots
    attn: str  # decode attention actually used ("triton", "matmul", "sdpa")
    k: list  # per layer (R, KVH, S, hd): the model's dtype, or fp8 with the scales below
    v: list
    k_scale: list | None  # fp8 cache: per layer (R, KVH, S) fp32
    v_scale: list | None
    mask: torch.Tensor  # (R, S) bool: slots a row attends
    pos: torch.Tensor  # (R,) position of the next fed token
    slot: torch.Tensor  # (1,) cache slot of the next fed token
    step: torch.Tensor  # (1,) index of the next sampled token
    tok: torch.Tensor  # (B,) last sampled token
    out: torch.Tensor  # (B, n) sampled tokens
    seeds: torch.Tensor  # (B,) int64
    scales: torch.Tensor  # (B, 1) fp32
    inv_temp: torch.Tensor  # () fp32
    noise: torch.Tensor | None = None  # (B, V) Exp(1) noise for the torch sampler
    graphs: dict | None = None
    impl: str = "v1"
    kv: tuple = ()  # the cache as whole tensors (layers stacked first): k, v[, k scales, v scales]; k, v are views
    start: torch.Tensor | None = None  # v2: (R,) int32 first slot a row attends (its left padding is skipped)
    prow: torch.Tensor | None = None  # v2: (R,) int32 the row whose cache holds this row's prefix
    plen: torch.Tensor | None = None  # v2: (1,) int32 prefix slots
    w_qkv: list | None = None  # v2: per layer, q/k/v (and gate/up) weights and biases concatenated
    b_qkv: list | None = None
    w_gu: list | None = None
    b_gu: list | None = None
    cap_rows: torch.Tensor | None = None  # teacher forcing: the rows whose logits are captured each step
    cap: torch.Tensor | None = None  # their logits (fp32)


class ImageRollout:
    """Samples image tokens for a batch of prefixes (given as embeddings) with CFG."""

    def __init__(self, net, n_tokens: int | None = None, bucket: int = 64, use_graphs: bool | None = None,
                 attn: str | None = None, kv_cache: str | None = None, compile: bool | None = None,
                 impl: str | None = None, config: decode_attn.Config | None = None, share_prefix: bool = True):
        import os

        self.net = net
        # decode-step attention: "auto" (Triton kernel on GPU, else matmul), "triton", "matmul" or "sdpa" (measured
        # on an H100: its masked q_len=1 kernel is not run-to-run deterministic, 30 % of tokens changed on a rerun)
        self.attn = attn or os.environ.get("JANUS_ROLLOUT_ATTN", "auto")
        self.kv_cache = kv_cache or "model"
        # torch.compile the Triton-attention step's layers (JANUS_ROLLOUT_COMPILE=0: off): measured on an H200,
        # 24.8 -> 28.2 images/s, the same tokens run to run and process to process; the first call compiles (~45 s)
        self.compile = os.environ.get("JANUS_ROLLOUT_COMPILE", "1") == "1" if compile is None else compile
        self._compiled: dict = {}
        self._compile_ok = False  # a compiled step has run: later errors are not compile problems
        # the step: "v1" (the engine as measured before v2) or "v2" (module docstring); v2's attention launch
        # configuration (None: decode_attn.default_config) and whether rows share one copy of a common prefix
        self.impl = impl or os.environ.get("JANUS_ROLLOUT_IMPL", "v2")
        self.config = config
        self.share_prefix = share_prefix
        self.captured_logits: torch.Tensor | None = None
        if self.attn not in ("auto", "triton", "matmul", "sdpa") or self.kv_cache not in ("model", "fp8") \
                or self.impl not in ("v1", "v2"):
            raise ValueError(f"attn {self.attn!r} / kv_cache {self.kv_cache!r} / impl {self.impl!r}: expected "
                             "auto|triton|matmul|sdpa, model|fp8 and v1|v2")
        self.lm = net.model.language_model
        self.n_tokens = n_tokens or net.config.vision_config.num_image_tokens
        self.bucket = bucket
        self.use_graphs = use_graphs
        self._state: _State | None = None
        tc = net.config.text_config
        self.H = tc.num_attention_heads
        self.KVH = tc.num_key_value_heads or self.H
        self.hd = getattr(tc, "head_dim", None) or tc.hidden_size // self.H
        self.V = net.config.vq_config.num_embeddings

    # ------------------------------------------------------------------ the model, layer by layer
    def _layers(self, x: torch.Tensor, pos: torch.Tensor, st: _State, S: int, prefill_mask=None,
                fresh: list | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (R, T, D) at positions pos (R, T): writes K/V at slots [0, T) (prefill) or `st.slot` (decode)
        and returns the final-norm hidden states. `fresh` (Triton decode): each layer's K/V in the cache's format
        is appended to it instead of written, and the kernel attends them as the step's own key and value.
        `rows` (prefill of v2's distinct prefixes): the cache rows that x's rows are written to."""
        cos, sin = self.lm.rotary_emb(x, pos)
        cos, sin = cos[:, None], sin[:, None]
        R, T, _ = x.shape
        h = x
        for i, layer in enumerate(self.lm.layers):
            a = layer.self_attn
            y = layer.input_layernorm(h)
            q = a.q_proj(y).view(R, T, -1, self.hd).transpose(1, 2)
            k = a.k_proj(y).view(R, T, -1, self.hd).transpose(1, 2)
            v = a.v_proj(y).view(R, T, -1, self.hd).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            if fresh is not None:
                fresh.append(self._cache_form(st, k, v))
                fp8 = (st.k_scale[i], st.v_scale[i]) if st.k_scale is not None else ()
                o = decode_attn.decode_attention(q, st.k[i], st.v[i], st.mask, st.slot, a.scaling, k, v, *fp8)
            else:
                self._store(st, i, self._cache_form(st, k, v), prefill_mask is not None, rows)
                o = self._attend(st, i, q, k, v, S, a.scaling, prefill_mask)
            h = h + a.o_proj(o.transpose(1, 2).reshape(R, T, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm.norm(h)

    def _attend(self, st: _State, i: int, q, k, v, S: int, scale: float, prefill_mask) -> torch.Tensor:
        """Layer i's attention output (R, H, T, hd): the prefix over its own exact K/V (whatever the cache's
        format), a decoding step over the cache."""
        if prefill_mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=prefill_mask, scale=scale,
                                                  enable_gqa=self.KVH != self.H)
        kk, vv = self._cached(st, i, S, q.dtype)
        m = st.mask[:, None, None, :S]
        if st.attn == "sdpa":
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=m, scale=scale, enable_gqa=self.KVH != self.H)
        if self.KVH != self.H:  # matmul: two batched GEMVs over the cache
            kk = kk.repeat_interleave(self.H // self.KVH, 1)
            vv = vv.repeat_interleave(self.H // self.KVH, 1)
        w = torch.matmul(q, kk.transpose(-1, -2)).float() * scale
        w = torch.softmax(w.masked_fill(~m, float("-inf")), -1).to(vv.dtype)
        return torch.matmul(w, vv)

    @staticmethod
    def _cache_form(st: _State, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """K/V (R, KVH, T, hd) as the cache stores them: (k, v), or fp8 (k bytes, v bytes, k scales, v scales)."""
        if st.k_scale is None:
            return k, v
        (kq, ks), (vq, vs) = decode_attn.quantize_fp8(k), decode_attn.quantize_fp8(v)
        return kq.view(torch.uint8), vq.view(torch.uint8), ks, vs

    @staticmethod
    def _store(st: _State, i: int, vals: tuple[torch.Tensor, ...], prefill: bool,
               rows: torch.Tensor | None = None) -> None:
        """Write layer i's `_cache_form` at slots [0, T) (prefill; of `rows` only, if given) or `st.slot`
        (decode); fp8 goes through byte views (index_copy_ has no fp8 kernel)."""
        dsts = (st.k[i], st.v[i]) if st.k_scale is None else (
            st.k[i].view(torch.uint8), st.v[i].view(torch.uint8), st.k_scale[i], st.v_scale[i])
        for dst, src in zip(dsts, vals):
            if prefill and rows is not None:
                dst[rows, :, :src.shape[2]] = src
            elif prefill:
                dst[:, :, :src.shape[2]] = src
            else:
                dst.index_copy_(2, st.slot, src)

    @staticmethod
    def _cached(st: _State, i: int, S: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's cached K/V at slots [0, S) in `dtype` (dequantized from fp8 where the cache is fp8)."""
        if st.k_scale is None:
            return st.k[i][:, :, :S], st.v[i][:, :, :S]
        return (decode_attn.dequantize_fp8(st.k[i][:, :, :S], st.k_scale[i][:, :, :S], dtype),
                decode_attn.dequantize_fp8(st.v[i][:, :, :S], st.v_scale[i][:, :, :S], dtype))

    def _sample(self, hidden: torch.Tensor, st: _State, sampler: str, top_k: int | None, cfg: bool,
                uniform_scale: float | None) -> None:
        """Sample token `st.step` for every sample from the last hidden states (R, D); advance the counters."""
        self._record(st, self._pick(hidden, st, sampler, top_k, cfg, uniform_scale))

    @staticmethod
    def _record(st: _State, tok: torch.Tensor) -> None:
        st.out.index_copy_(1, st.step, tok[:, None])
        st.tok.copy_(tok)
        st.step.add_(1)

    def _pick(self, hidden: torch.Tensor, st: _State, sampler: str, top_k: int | None, cfg: bool,
              uniform_scale: float | None) -> torch.Tensor:
        """Token `st.step` (B,) for every sample from the last hidden states (R, D) (reads the state only)."""
        return self._choose(self.net.model.generation_head(hidden), st, sampler, top_k, cfg, uniform_scale)

    @staticmethod
    def _capture(st: _State, logits: torch.Tensor) -> None:
        if st.cap is not None:  # teacher forcing: keep the captured rows' logits of this step
            st.cap.copy_(logits.index_select(0, st.cap_rows))

    def _choose(self, logits: torch.Tensor, st: _State, sampler: str, top_k: int | None, cfg: bool,
                uniform_scale: float | None) -> torch.Tensor:
        """Token `st.step` (B,) for every sample from the head's logits (R, V)."""
        self._capture(st, logits)
        B = st.B
        if sampler == "torch":  # transformers' order and dtypes: CFG, temperature, top-k, softmax, multinomial
            if cfg:
                c, u = logits[:B], logits[B:]
                logits = u + (c - u) * (uniform_scale if uniform_scale is not None else st.scales.to(c.dtype))
            if self._temperature != 1.0:
                logits = logits / self._temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k)[0][..., -1, None]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if self._greedy:
                tok = logits.argmax(-1)
            else:
                probs = torch.softmax(logits, dim=-1)
                tok = (probs / st.noise.to(probs.dtype)).argmax(-1)
        else:
            logits = logits.float()
            if cfg:
                c, u = logits[:B], logits[B:]
                logits = u + (c - u) * st.scales
            if self._greedy:
                tok = logits.argmax(-1)
            else:
                logits = logits * st.inv_temp
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k)[0][..., -1, None]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                g = -torch.log(-torch.log(hash_uniform(st.seeds, st.step, logits.shape[-1])))
                tok = (logits + g).argmax(-1)
        return tok

    def _fused(self, st: _State, cfg: bool) -> tuple[torch.Tensor, list]:
        """The layers of a Triton-attention decoding step, reading the state only: (last hidden states (R, D),
        each layer's K/V to cache). Pure, so torch.compile can take it whole (`compile`). The sampler stays out:
        Inductor turns the hash's arange into int32 indices and refuses its 64-bit constants."""
        tok = torch.cat([st.tok, st.tok]) if cfg else st.tok
        x = self.net.prepare_embeddings_for_image_generation(tok[:, None])
        fresh: list = []
        h = self._layers(x, st.pos[:, None], st, st.S, fresh=fresh)
        return h[:, -1], fresh

    def _fused_v2(self, st: _State, cfg: bool) -> tuple[torch.Tensor, list]:
        """v2's decoding step up to the head, reading the state only: (the head's logits (R, V), the step's K/V
        of all layers stacked (layers, R, KVH, 1, hd), in the cache's format). Pure, like `_fused`."""
        tok = torch.cat([st.tok, st.tok]) if cfg else st.tok
        x = self.net.prepare_embeddings_for_image_generation(tok[:, None])
        cos, sin = self.lm.rotary_emb(x, st.pos[:, None])
        cos, sin = cos[:, None], sin[:, None]
        R = x.shape[0]
        nq, nkv = self.H * self.hd, self.KVH * self.hd
        attend = decode_attn.decode_attention_v2 if st.attn == "triton" else decode_attn.decode_attention_v2_ref
        kw = {"config": self.config} if st.attn == "triton" else {}
        forms = []
        h = x
        for i, layer in enumerate(self.lm.layers):
            a, mlp = layer.self_attn, layer.mlp
            qkv = F.linear(layer.input_layernorm(h), st.w_qkv[i], st.b_qkv[i])
            q = qkv[..., :nq].view(R, 1, self.H, self.hd).transpose(1, 2)
            k = qkv[..., nq:nq + nkv].view(R, 1, self.KVH, self.hd).transpose(1, 2)
            v = qkv[..., nq + nkv:].view(R, 1, self.KVH, self.hd).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            forms.append(self._cache_form(st, k, v))
            fp8 = (st.k_scale[i], st.v_scale[i]) if st.k_scale is not None else ()
            o = attend(q, st.k[i], st.v[i], st.start, st.prow, st.plen, st.slot, a.scaling, k, v, *fp8, **kw)
            h = h + a.o_proj(o.transpose(1, 2).reshape(R, 1, -1))
            gate, up = F.linear(layer.post_attention_layernorm(h), st.w_gu[i], st.b_gu[i]).chunk(2, -1)
            h = h + mlp.down_proj(mlp.act_fn(gate) * up)
        logits = self.net.model.generation_head(self.lm.norm(h)[:, -1])
        return logits, [torch.stack(t) for t in zip(*forms)]

    def _decode_step_v2(self, st: _State, sampler: str, top_k, cfg: bool, uniform_scale) -> None:
        logits, forms = self._layers_step(st, cfg)
        if st.attn == "triton" and sampler == "hash" and top_k is None and not self._greedy \
                and sample_kernel.available(logits.device):
            self._capture(st, logits)
            tok = sample_kernel.gumbel_argmax(logits, st.seeds, st.scales, st.inv_temp, st.step, cfg)
        else:
            tok = self._choose(logits, st, sampler, top_k, cfg, uniform_scale)
        # the cache, all layers in one copy per tensor: slot is dim 3 of (layers, R, KVH, S[, hd])
        dsts = st.kv if st.k_scale is None else (st.kv[0].view(torch.uint8), st.kv[1].view(torch.uint8), *st.kv[2:])
        for dst, src in zip(dsts, forms):
            decode_attn.write_slot(dst, src, st.slot, 3)
        st.mask.index_fill_(1, st.slot, True)
        st.pos.add_(1)
        st.slot.add_(1)
        self._record(st, tok)

    def _decode_step(self, st: _State, S: int, sampler: str, top_k, cfg: bool, uniform_scale) -> None:
        if st.impl == "v2":
            return self._decode_step_v2(st, sampler, top_k, cfg, uniform_scale)
        if st.attn == "triton":
            h, fresh = self._layers_step(st, cfg)
            tok = self._pick(h, st, sampler, top_k, cfg, uniform_scale)
            for i, src in enumerate(fresh):
                self._store(st, i, src, False)
            st.mask.index_fill_(1, st.slot, True)
            st.pos.add_(1)
            st.slot.add_(1)
            self._record(st, tok)
            return
        tok = torch.cat([st.tok, st.tok]) if cfg else st.tok
        x = self.net.prepare_embeddings_for_image_generation(tok[:, None])
        st.mask.index_fill_(1, st.slot, True)
        h = self._layers(x, st.pos[:, None], st, S)
        st.pos.add_(1)
        st.slot.add_(1)
        self._sample(h[:, -1], st, sampler, top_k, cfg, uniform_scale)

    def _layers_step(self, st: _State, cfg: bool) -> tuple[torch.Tensor, list]:
        fused = self._fused_v2 if st.impl == "v2" else self._fused
        if not self.compile or st.attn != "triton":  # the reference attention (no Triton) runs eagerly
            return fused(st, cfg)
        try:
            out = self._compiled_fused(st.impl)(st, cfg)
        except Exception as exc:  # noqa: BLE001 - a compiler that cannot take the step: run it eagerly, say so
            if self._compile_ok:
                raise
            import warnings

            warnings.warn(f"rollout engine: torch.compile failed ({type(exc).__name__}: {str(exc)[:300]}); "
                          "running the step eagerly", stacklevel=2)
            self.compile = False
            return fused(st, cfg)
        self._compile_ok = True
        return out

    def _compiled_fused(self, impl: str = "v1"):
        """`_fused` (v2: `_fused_v2`) through torch.compile (Inductor fuses the norms, rotary embedding and
        activations; matrix products stay cuBLAS'; deterministic mode where Inductor has one: no benchmark-picked
        kernels)."""
        if impl not in self._compiled:
            from torch._inductor import config as ic

            opts = {"deterministic": True} if hasattr(ic, "deterministic") else {}
            fn = self._fused_v2 if impl == "v2" else self._fused
            self._compiled[impl] = torch.compile(fn, dynamic=False, options=opts)
        return self._compiled[impl]

    # ------------------------------------------------------------------ state
    def _resolved_attn(self, dev: torch.device) -> str:
        if self.attn == "auto":  # the kernel spans the head dimension with one power-of-two range
            return "triton" if decode_attn.available(dev) and not self.hd & (self.hd - 1) else "matmul"
        if self.attn == "triton" and not decode_attn.available(dev):
            raise RuntimeError(f"attn='triton' needs Triton and a CUDA device (got {dev})")
        return self.attn

    def _alloc(self, key: tuple, R: int, B: int, L: int, dev, dtype) -> _State:
        S = L + self.n_tokens
        shape = (R, self.KVH, S, self.hd)
        nl = len(self.lm.layers)
        z = lambda *s, **kw: torch.zeros(*s, device=dev, **kw)  # noqa: E731
        fp8 = self.kv_cache == "fp8"
        kv_dtype = decode_attn.FP8 if fp8 else dtype
        # each cache tensor whole, layers first (v2 writes a step's slot of all layers in one copy); per-layer views
        kv = (z((nl, *shape), dtype=kv_dtype), z((nl, *shape), dtype=kv_dtype))
        if fp8:
            kv += (z((nl, *shape[:3]), dtype=torch.float32), z((nl, *shape[:3]), dtype=torch.float32))
        views = [list(t.unbind(0)) for t in kv]
        st = _State(key=key, R=R, B=B, L=L, S=S, attn=self._resolved_attn(torch.device(dev)),
                    k=views[0], v=views[1], k_scale=views[2] if fp8 else None, v_scale=views[3] if fp8 else None,
                    mask=z(R, S, dtype=torch.bool), pos=z(R, dtype=torch.long), slot=z(1, dtype=torch.long),
                    step=z(1, dtype=torch.long), tok=z(B, dtype=torch.long),
                    out=z(B, self.n_tokens, dtype=torch.long), seeds=z(B, dtype=torch.long),
                    scales=z(B, 1, dtype=torch.float32), inv_temp=z((), dtype=torch.float32), impl=self.impl, kv=kv)
        if self.impl == "v2":
            st.start, st.prow = z(R, dtype=torch.int32), z(R, dtype=torch.int32)
            st.plen = z(1, dtype=torch.int32)
            st.w_qkv, st.b_qkv, st.w_gu, st.b_gu = [], [], [], []
            for layer in self.lm.layers:
                a, m = layer.self_attn, layer.mlp
                for ws, bs, mods in ((st.w_qkv, st.b_qkv, (a.q_proj, a.k_proj, a.v_proj)),
                                     (st.w_gu, st.b_gu, (m.gate_proj, m.up_proj))):
                    ws.append(torch.empty(sum(p.weight.shape[0] for p in mods), mods[0].weight.shape[1],
                                          device=dev, dtype=mods[0].weight.dtype))
                    bs.append(None if mods[0].bias is None else
                              torch.empty(ws[-1].shape[0], device=dev, dtype=mods[0].bias.dtype))
        return st

    def _refresh_weights(self, st: _State) -> None:
        """v2's concatenated projection weights from the model's current ones (in place: graphs read them)."""
        for i, layer in enumerate(self.lm.layers):
            a, m = layer.self_attn, layer.mlp
            for w, b, mods in ((st.w_qkv[i], st.b_qkv[i], (a.q_proj, a.k_proj, a.v_proj)),
                               (st.w_gu[i], st.b_gu[i], (m.gate_proj, m.up_proj))):
                torch.cat([p.weight for p in mods], out=w)
                if b is not None:
                    torch.cat([p.bias for p in mods], out=b)

    @staticmethod
    def prefix_groups(x: torch.Tensor, keym: torch.Tensor) -> torch.Tensor:
        """(R,) int64: for each row of left-padded prefixes x (R, L, D) with key mask keym (R, L), the first row
        with the same prefix (itself if none). Candidates by a random projection, each checked exactly."""
        R = x.shape[0]
        g = torch.Generator().manual_seed(0)
        w = torch.randn(x.shape[1], x.shape[2], generator=g).to(x.device)
        fp = (x.float() * w).sum((1, 2)).tolist()
        lens = keym.sum(1).tolist()
        first: dict = {}
        lead = torch.tensor([first.setdefault((f, n), r) for r, (f, n) in enumerate(zip(fp, lens))],
                            device=x.device)
        same = (x == x[lead]).flatten(1).all(1) & (keym == keym[lead]).all(1)
        return torch.where(same, lead, torch.arange(R, device=x.device))

    def release(self) -> None:
        self._state = None

    def _buckets(self, st: _State) -> list[int]:
        """Attention lengths: the cache length rounded up to `bucket` slots (the Triton kernel reads the length
        from the slot counter: one length, one graph)."""
        return sorted({self._bucket_of(st, s) for s in range(st.L + 1, st.S + 1)})

    def _bucket_of(self, st: _State, length: int) -> int:
        if st.attn == "triton":
            return st.S
        return min(st.S, int(math.ceil(length / self.bucket)) * self.bucket)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def sample(self, cond: list[torch.Tensor], uncond: list[torch.Tensor] | None, seeds: list[int],
               cfg_scales: list[float], temperature: float = 1.0, top_k: int | None = None,
               sampler: str = "hash", pad_to: int = 1, force: torch.Tensor | None = None,
               capture: int = 0) -> torch.Tensor:
        """Image tokens (B, n_tokens) for prefixes given as embeddings (each (L_i, D)).

        `uncond`: the unconditional prefixes (None: no guidance). Rows are left-padded to a common length
        (rounded up to `pad_to`, so graphs are reused across calls).
        Teacher forcing: `force` (B, n_tokens) is fed instead of the sampled tokens (which are still returned:
        an engine forced with its own tokens returns them again) and, with `capture` = n > 0, the guided logits
        (CFG applied, before temperature) of samples [0, n) at every step are left in `captured_logits`.
        Kept in one function: it is one decode loop over the preallocated `_State` (reset, prefill, then a
        graph replay or an eager step per token); the per-token work already lives in `_sample`/`_decode_step`.
        """
        if sampler not in ("hash", "torch"):
            raise ValueError(f"sampler {sampler!r}: expected 'hash' or 'torch'")
        B = len(cond)
        cfg = uncond is not None and any(s != 1.0 for s in cfg_scales)
        rows = list(cond) + (list(uncond) if cfg else [])
        R = len(rows)
        dev, dtype = rows[0].device, rows[0].dtype
        L = max(r.shape[0] for r in rows)
        L = int(math.ceil(L / pad_to)) * pad_to
        self._temperature = float(temperature)
        self._greedy = temperature <= 0
        graphs = self.use_graphs if self.use_graphs is not None else dev.type == "cuda"
        graphs = graphs and sampler == "hash"
        key = (R, B, L, str(dev), dtype, self.attn, self.kv_cache, self.impl)
        st = self._state
        if st is None or st.key != key:
            self._state = None
            st = self._state = self._alloc(key, R, B, L, dev, dtype)
        # prefix, left-padded
        D = rows[0].shape[1]
        x = torch.zeros(R, L, D, device=dev, dtype=dtype)
        keym = torch.zeros(R, L, dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            x[i, L - r.shape[0]:] = r
            keym[i, L - r.shape[0]:] = True
        pos = (keym.long().cumsum(-1) - 1).clamp_(min=0)
        lead = None
        if st.impl == "v2":
            lead = self.prefix_groups(x, keym) if self.share_prefix else torch.arange(R, device=dev)
            st.prow.copy_(lead)
            st.start.copy_(L - keym.sum(-1))
            st.plen.fill_(L)
            self._refresh_weights(st)
        # reset the counters and masks
        st.mask.zero_()
        st.mask[:, :L] = keym
        st.pos.copy_(keym.sum(-1))
        st.slot.fill_(L)
        st.step.zero_()
        st.seeds.copy_(torch.tensor([int(s) & 0x7FFF_FFFF_FFFF_FFFF for s in seeds], device=dev))
        st.scales.copy_(torch.tensor(cfg_scales, dtype=torch.float32, device=dev)[:, None])
        st.inv_temp.fill_(1.0 / temperature if temperature > 0 else 1.0)
        uniform = cfg_scales[0] if len(set(cfg_scales)) == 1 else None
        gens = None
        if sampler == "torch" and not self._greedy:
            gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
            if st.noise is None or st.noise.shape != (B, self.V):
                st.noise = torch.empty(B, self.V, device=dev, dtype=dtype)
            self._draw(st, gens)
        causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        pm = (causal[None] & keym[:, None, :]) | torch.eye(L, dtype=torch.bool, device=dev)[None]
        if lead is not None:  # v2: each distinct prefix once, into its first row
            uniq, inv = torch.unique(lead, return_inverse=True)
            h = self._layers(x[uniq], pos[uniq], st, L, prefill_mask=pm[uniq][:, None], rows=uniq)[inv]
        else:
            h = self._layers(x, pos, st, L, prefill_mask=pm[:, None])
        self._start_capture(st, capture, B, cfg)
        self._sample(h[:, -1], st, sampler, top_k, cfg, uniform)
        forced = force.to(dev) if force is not None else None
        self._after_step(st, forced, 0)  # before the graphs' warm-up steps overwrite the captured logits
        if graphs:
            self._ensure_graphs(st, top_k, cfg, uniform)
        for t in range(1, self.n_tokens):
            S = self._bucket_of(st, L + t)
            if graphs:
                st.graphs[S].replay()
            else:
                if gens is not None:
                    self._draw(st, gens)
                self._decode_step(st, S, sampler, top_k, cfg, uniform)
            self._after_step(st, forced, t)
        return st.out.clone()

    def _start_capture(self, st: _State, n: int, B: int, cfg: bool) -> None:
        """The capture buffer of teacher forcing: kept while calls capture the same rows (captured graphs write
        into it); dropped by a call that captures nothing (its graphs are captured without it)."""
        self.captured_logits = None
        if not n:
            st.cap = st.cap_rows = None
            return
        n = min(n, B)
        idx = list(range(n)) + ([B + i for i in range(n)] if cfg else [])
        if st.cap is None or st.cap.shape[0] != len(idx):
            st.cap_rows = torch.tensor(idx, device=st.tok.device)
            st.cap = torch.zeros(len(idx), self.V, device=st.tok.device, dtype=torch.float32)
        self.captured_logits = torch.zeros(n, self.n_tokens, self.V, device=st.tok.device, dtype=torch.float32)

    def _after_step(self, st: _State, forced: torch.Tensor | None, t: int) -> None:
        """Teacher forcing after step t: keep the captured logits (guided), feed the forced token."""
        if st.cap is not None:
            n = self.captured_logits.shape[0]
            lg = st.cap
            if lg.shape[0] > n:  # conditional rows, then unconditional: the guidance the sampler applies
                c, u = lg[:n], lg[n:]
                lg = u + (c - u) * st.scales[:n]
            self.captured_logits[:, t] = lg
        if forced is not None:
            st.tok.copy_(forced[:, t])

    def _draw(self, st: _State, gens) -> None:
        for b, g in enumerate(gens):
            st.noise[b].exponential_(1, generator=g)

    def _ensure_graphs(self, st: _State, top_k, cfg: bool, uniform) -> None:
        gkey = (top_k, cfg, self._greedy, None if st.cap is None else st.cap.data_ptr())
        if st.graphs is not None and st.graphs.get("_key") == gkey:
            return
        # warm up on a side stream (this runs steps: save and restore the counters; the cache slots they write
        # are written again by the real steps), then capture
        saved = [t.clone() for t in (st.mask, st.pos, st.slot, st.step, st.tok, st.out)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        buckets = self._buckets(st)
        with torch.cuda.stream(s):
            for S in buckets[:2]:
                self._decode_step(st, S, "hash", top_k, cfg, None)
        torch.cuda.current_stream().wait_stream(s)
        graphs: dict = {"_key": gkey}
        pool = torch.cuda.graph_pool_handle()
        for S in buckets:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._decode_step(st, S, "hash", top_k, cfg, None)
            graphs[S] = g
        torch.cuda.synchronize()
        for t, v in zip((st.mask, st.pos, st.slot, st.step, st.tok, st.out), saved):
            t.copy_(v)
        st.graphs = graphs


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin
