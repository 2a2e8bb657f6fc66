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
  rotary embedding, so it computes what the model computes.

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

from model.janus import decode_attn

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


class ImageRollout:
    """Samples image tokens for a batch of prefixes (given as embeddings) with CFG."""

    def __init__(self, net, n_tokens: int | None = None, bucket: int = 64, use_graphs: bool | None = None,
                 attn: str | None = None, kv_cache: str | None = None, compile: bool | None = None):
        import os

        self.net = net
        # decode-step attention: "auto" (Triton kernel on GPU, else matmul), "triton", "matmul" or "sdpa" (measured
        # on an H100: its masked q_len=1 kernel is not run-to-run deterministic, 30 % of tokens changed on a rerun)
        self.attn = attn or os.environ.get("JANUS_ROLLOUT_ATTN", "auto")
        self.kv_cache = kv_cache or "model"
        # torch.compile the Triton-attention step's layers (JANUS_ROLLOUT_COMPILE=0: off): measured on an H200,
        # 24.8 -> 28.2 images/s, the same tokens run to run and process to process; the first call compiles (~45 s)
        self.compile = os.environ.get("JANUS_ROLLOUT_COMPILE", "1") == "1" if compile is None else compile
        self._compiled = None
        self._compile_ok = False  # a compiled step has run: later errors are not compile problems
        if self.attn not in ("auto", "triton", "matmul", "sdpa") or self.kv_cache not in ("model", "fp8"):
            raise ValueError(f"attn {self.attn!r} / kv_cache {self.kv_cache!r}: expected auto|triton|matmul|sdpa "
                             "and model|fp8")
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
                fresh: list | None = None) -> torch.Tensor:
        """x (R, T, D) at positions pos (R, T): writes K/V at slots [0, T) (prefill) or `st.slot` (decode)
        and returns the final-norm hidden states. `fresh` (Triton decode): each layer's K/V in the cache's format
        is appended to it instead of written, and the kernel attends them as the step's own key and value."""
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
                self._store(st, i, self._cache_form(st, k, v), prefill_mask is not None)
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
    def _store(st: _State, i: int, vals: tuple[torch.Tensor, ...], prefill: bool) -> None:
        """Write layer i's `_cache_form` at slots [0, T) (prefill) or `st.slot` (decode); fp8 goes through byte
        views (index_copy_ has no fp8 kernel)."""
        dsts = (st.k[i], st.v[i]) if st.k_scale is None else (
            st.k[i].view(torch.uint8), st.v[i].view(torch.uint8), st.k_scale[i], st.v_scale[i])
        for dst, src in zip(dsts, vals):
            if prefill:
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
        logits = self.net.model.generation_head(hidden)
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

    def _decode_step(self, st: _State, S: int, sampler: str, top_k, cfg: bool, uniform_scale) -> None:
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
        if not self.compile:
            return self._fused(st, cfg)
        try:
            out = self._compiled_fused()(st, cfg)
        except Exception as exc:  # noqa: BLE001 - a compiler that cannot take the step: run it eagerly, say so
            if self._compile_ok:
                raise
            import warnings

            warnings.warn(f"rollout engine: torch.compile failed ({type(exc).__name__}: {str(exc)[:300]}); "
                          "running the step eagerly", stacklevel=2)
            self.compile = False
            return self._fused(st, cfg)
        self._compile_ok = True
        return out

    def _compiled_fused(self):
        """`_fused` through torch.compile (Inductor fuses the norms, rotary embedding and activations;
        matrix products stay cuBLAS'; deterministic mode where Inductor has one: no benchmark-picked kernels)."""
        if self._compiled is None:
            from torch._inductor import config as ic

            opts = {"deterministic": True} if hasattr(ic, "deterministic") else {}
            self._compiled = torch.compile(self._fused, dynamic=False, options=opts)
        return self._compiled

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
        scales = (lambda: [z(shape[:3], dtype=torch.float32) for _ in range(nl)]) if fp8 else (lambda: None)
        return _State(key=key, R=R, B=B, L=L, S=S, attn=self._resolved_attn(torch.device(dev)),
                      k=[torch.zeros(shape, device=dev, dtype=kv_dtype) for _ in range(nl)],
                      v=[torch.zeros(shape, device=dev, dtype=kv_dtype) for _ in range(nl)],
                      k_scale=scales(), v_scale=scales(),
                      mask=z(R, S, dtype=torch.bool), pos=z(R, dtype=torch.long), slot=z(1, dtype=torch.long),
                      step=z(1, dtype=torch.long), tok=z(B, dtype=torch.long),
                      out=z(B, self.n_tokens, dtype=torch.long), seeds=z(B, dtype=torch.long),
                      scales=z(B, 1, dtype=torch.float32), inv_temp=z((), dtype=torch.float32))

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
               sampler: str = "hash", pad_to: int = 1) -> torch.Tensor:
        """Image tokens (B, n_tokens) for prefixes given as embeddings (each (L_i, D)).

        `uncond`: the unconditional prefixes (None: no guidance). Rows are left-padded to a common length
        (rounded up to `pad_to`, so graphs are reused across calls).
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
        key = (R, B, L, str(dev), dtype, self.attn, self.kv_cache)
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
        h = self._layers(x, pos, st, L, prefill_mask=pm[:, None])
        self._sample(h[:, -1], st, sampler, top_k, cfg, uniform)
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
        return st.out.clone()

    def _draw(self, st: _State, gens) -> None:
        for b, g in enumerate(gens):
            st.noise[b].exponential_(1, generator=g)

    def _ensure_graphs(self, st: _State, top_k, cfg: bool, uniform) -> None:
        gkey = (top_k, cfg, self._greedy)
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
