"""BAGEL's network: a Mixture-of-Transformers Qwen2 LLM, a SigLIP NaViT encoder, and the glue to VAE latents.

Written here on transformers' Qwen2 and SigLIP building blocks, after the paper and the official code
(ByteDance-Seed/Bagel, `modeling/bagel/`), whose module tree and parameter names it keeps so that the official
`ema.safetensors` loads with `load_state_dict` and ours loads in the official code.

Mixture-of-Transformers: every layer has two sets of weights, understanding (text and ViT tokens) and generation
(VAE latent tokens, the `*_moe_gen` twins): QKV and output projections, QK-norm, MLP and both RMSNorms, and the final
norm. Each token goes through its own set, but there is ONE self-attention over the whole packed sequence, so the
two kinds of token see each other wherever the attention mask allows.

Positions, as the official code assigns them: text tokens take consecutive RoPE positions; all tokens of one image
(its start / end markers, every ViT patch or every latent) share ONE RoPE position, and the sequence goes on at that
position + 1. An image's 2-D layout comes from additive sin-cos tables instead (`vit_pos_embed`,
`latent_pos_embed`), indexed row * max_per_side + col (`latent_position_ids`, `vit_position_ids`). The start / end
markers are text tokens and use the understanding weights; only latent tokens use the generation weights.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, SiglipVisionConfig
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from model.bagel.config import BagelConfig
from model.registry import to_device

KV = tuple[torch.Tensor, torch.Tensor]

# the official ViT transform: ImageTransform(980, 224, 14) with its default pixel budget and mean / std 0.5
VIT_MIN_SIDE = 224
VIT_MAX_PIXELS = 14 * 14 * 9 * 1024


# ---------------------------------------------------------------- positions


def flattened_position_ids_extrapolate(h: int, w: int, max_per_side: int) -> torch.Tensor:
    """Row-major ids of an h x w grid in a max_per_side-wide table (official `get_flattened_position_ids_extrapolate`,
    given the grid in tokens rather than pixels)."""
    return (torch.arange(h)[:, None] * max_per_side + torch.arange(w)).flatten()


def flattened_position_ids_interpolate(h: int, w: int, max_per_side: int) -> torch.Tensor:
    """The grid stretched over the whole table (official `get_flattened_position_ids_interpolate`)."""
    boundaries = torch.arange(1 / max_per_side, 1.0, 1 / max_per_side)
    rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), boundaries, right=True)
    cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), boundaries, right=True)
    return (rows[:, None] * max_per_side + cols).flatten()


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """DiT / MAE 2-D sin-cos table, (grid_size^2, dim), row-major: its first half encodes the column, the second
    half the row (official `get_2d_sincos_pos_embed`, whose meshgrid puts w first)."""
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32),
                             indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb).float()


# ---------------------------------------------------------------- image -> ViT patches


def _make_divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def vit_resize_shape(width: int, height: int, max_side: int, min_side: int = VIT_MIN_SIDE, stride: int = 14,
                     max_pixels: int = VIT_MAX_PIXELS) -> tuple[int, int]:
    """(new_width, new_height) as the official `MaxLongEdgeMinShortEdgeResize` computes it, quirks included (its
    pixel cap scales the sides by an area ratio)."""

    def scaled(w: int, h: int, s: float) -> tuple[int, int]:
        return _make_divisible(round(w * s), stride), _make_divisible(round(h * s), stride)

    scale = min(max_side / max(width, height), 1.0)
    scale = max(scale, min_side / min(width, height))
    w, h = scaled(width, height, scale)
    if w * h > max_pixels:
        w, h = scaled(w, h, max_pixels / (w * h))
    if max(w, h) > max_side:
        w, h = scaled(w, h, max_side / max(w, h))
    return w, h


def patchify(image: torch.Tensor, p: int) -> torch.Tensor:
    """(C, H, W) -> (H/p * W/p, p * p * C), row-major patches, each flattened (row, col, channel)."""
    c, h, w = image.shape
    x = image.reshape(c, h // p, p, w // p, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * c)


def vit_patchify(image, max_side: int = 980, *, min_side: int = VIT_MIN_SIDE, patch_size: int = 14,
                 max_num_patch_per_side: int = 70, max_pixels: int = VIT_MAX_PIXELS):
    """A PIL image -> (pixel_values (n, 3*p*p) float32, position_ids (n,), (rows, cols) of patches), as the official
    ViT transform gives them: RGB on white, bicubic resize to sides that are multiples of the patch, values
    normalised to [-1, 1]."""
    from PIL import Image

    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        image = white
    else:
        image = image.convert("RGB")
    min_side = min(min_side, max_side)
    w, h = vit_resize_shape(image.width, image.height, max_side, min_side, patch_size, max_pixels)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    x = (x - 0.5) / 0.5
    rows, cols = h // patch_size, w // patch_size
    return patchify(x, patch_size), flattened_position_ids_extrapolate(rows, cols, max_num_patch_per_side), (rows, cols)


# ---------------------------------------------------------------- fused elementwise work (GPU)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm's arithmetic, op for op."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rope(q, k, cos, sin):
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)


FUSE_ON = {"cuda"}  # device types where `fuse` takes effect (CPU compiles slowly and gains little)
_COMPILED: dict = {}
_RAN: set = set()
_EAGER: list[str] = []  # set once the compiler has failed: everything runs eagerly from then on


def fused(fn, *args):
    """fn(*args) through torch.compile: Inductor makes each of these elementwise chains one kernel forward and one
    backward, where eager runs five to eight, each a round trip through memory. Dynamic shapes: the rows change
    with every sequence. A compiler that cannot take it warns once and everything runs eagerly."""
    if not _EAGER:
        if fn not in _COMPILED:
            _COMPILED[fn] = torch.compile(fn, dynamic=True)
        try:
            out = _COMPILED[fn](*args)
            _RAN.add(fn)
            return out
        except Exception as exc:  # noqa: BLE001 - a compiler problem, unless this function already ran compiled
            if fn in _RAN:
                raise
            warnings.warn(f"BAGEL: torch.compile failed ({type(exc).__name__}: {str(exc)[:300]}); running eagerly",
                          stacklevel=2)
            _EAGER.append(repr(exc))
    return fn(*args)


class RMSNorm(Qwen2RMSNorm):
    """Qwen2RMSNorm (same parameter, same arithmetic), fused on a GPU when the network says so."""

    fuse = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse and x.device.type in FUSE_ON:
            return fused(_rms_norm, x, self.weight, self.variance_epsilon)
        return super().forward(x)


class MLP(Qwen2MLP):
    """Qwen2MLP with its SiLU-and-multiply fused on a GPU when the network says so."""

    fuse = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse and x.device.type in FUSE_ON:
            return self.down_proj(fused(_silu_mul, self.gate_proj(x), self.up_proj(x)))
        return super().forward(x)


# ---------------------------------------------------------------- per-token routing


# the understanding rows are "few" below 1 / FEW of a sequence's rows
FEW = 32


class _Route:
    """Which rows of a packed sequence are understanding and which are generation tokens. The mask may come from
    the host (the blocks know their rows there): its indices are then found on the host and queued to `device`,
    where `nonzero` on the device would stop the host until the GPU caught up."""

    def __init__(self, gen_mask: torch.Tensor, device: torch.device | str | None = None):
        self.n = gen_mask.shape[0]
        device = gen_mask.device if device is None else device
        if gen_mask.device.type == "cpu":
            self.gen = to_device(gen_mask.nonzero().squeeze(1), device)
            self.und = to_device((~gen_mask).nonzero().squeeze(1), device)
        else:
            self.gen = gen_mask.nonzero().squeeze(1)
            self.und = (~gen_mask).nonzero().squeeze(1)

    def __call__(self, x: torch.Tensor, und_fn, gen_fn) -> torch.Tensor:
        """und_fn on the understanding rows, gen_fn on the generation rows, put back in place."""
        if self.gen.numel() == 0:
            return und_fn(x)
        if self.und.numel() == 0:
            return gen_fn(x)
        if self.und.numel() * FEW <= self.n:
            # an image block's two markers among its latents: the generation weights run over every row (every op
            # routed is row-wise) and the few rows are overwritten, so no copy of the many rows is gathered or
            # scattered; the markers' extra rows cost about 2 / (tokens in the block) of the work
            out = gen_fn(x)
            if out.data_ptr() == x.data_ptr():  # an identity (no QK-norm): never write into the input
                out = out.clone()
            out[self.und] = und_fn(x[self.und])
            return out
        yu, yg = und_fn(x[self.und]), gen_fn(x[self.gen])
        out = yu.new_empty((self.n, *yu.shape[1:]))
        out[self.und] = yu
        out[self.gen] = yg
        return out


# ---------------------------------------------------------------- the MoT LLM


def _pieces(x: torch.Tensor, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
    """x[:, :, a:b] for each (a, b) of `ranges` (dim 2), by one `split` where the ranges tile x in order."""
    tiled = ranges[0][0] == 0 and ranges[-1][1] == x.shape[2] and all(
        a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if tiled:
        return list(x.split([b - a for a, b in ranges], dim=2))
    return [x[:, :, a:b] for a, b in ranges]


def attend(q, k, v, attn_mask=None, segments=None, key_starts=None):
    """SDPA of q (B, H, L, d) over k, v (B, H, P + L, d), the P cached keys first, in one of three forms:
    - `attn_mask` (B, L, P + L) bool, or None: every query sees every key (the flash kernels apply);
    - `segments` (one sequence): (start, end, causal[, first]) row ranges that each see every key from `first`
      (default 0: several examples packed in one sequence see only their own) to their end, causal rows their own
      block's past only: an image block (not causal) needs no mask, so it keeps the flash kernels, and a text
      block's mask is only its own rows;
    - `key_starts`: sequence b sees keys from key_starts[b] on (left-padded caches of different lengths), no mask.
    """
    if segments is not None:
        P, outs = k.shape[2] - q.shape[2], []
        # rows and keys are cut with `split` where the pieces tile the tensor: a slice's backward zero-fills and
        # adds a gradient of the whole tensor per slice, a split's is one concatenation
        qs = _pieces(q, [(s, e) for s, e, *_ in segments])
        key_end: dict[int, int] = {}  # each key start (an example packed with others) -> its last segment's end
        for seg in segments:
            ks = P + seg[3] if len(seg) > 3 else 0
            key_end[ks] = max(key_end.get(ks, 0), P + seg[1])
        ranges = sorted(key_end.items())
        kv = dict(zip((a for a, _ in ranges), zip(_pieces(k, ranges), _pieces(v, ranges))))
        for seg, qi in zip(segments, qs):
            s, e, causal = seg[:3]
            ks, ke = (P + seg[3] if len(seg) > 3 else 0), P + e
            kp, vp = kv[ks]
            if ke - ks < kp.shape[2]:  # an earlier block of its example: a prefix of the example's keys
                kp, vp = kp[:, :, :ke - ks], vp[:, :, :ke - ks]
            mask = None
            if causal and e - s > 1:  # row i of the block sees keys up to its own absolute position
                mask = torch.ones((e - s, ke - ks), dtype=torch.bool, device=q.device).tril(diagonal=P + s - ks)
            outs.append(F.scaled_dot_product_attention(qi, kp, vp, attn_mask=mask))
        return torch.cat(outs, dim=2)
    if key_starts is not None:
        return torch.cat([F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, ks:], v[b:b + 1, :, ks:])
                          for b, ks in enumerate(key_starts)])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if attn_mask is None else attn_mask[:, None])


class MoTAttention(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        c = cfg.llm
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        d, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        # Qwen2: biased QKV, unbiased output projection
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, q), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o_proj = nn.Linear(q, d, bias=False)
        self.q_proj_moe_gen = nn.Linear(d, q)
        self.k_proj_moe_gen, self.v_proj_moe_gen = nn.Linear(d, kv), nn.Linear(d, kv)
        self.o_proj_moe_gen = nn.Linear(q, d, bias=False)

        def norm():
            return RMSNorm(c.head_dim, eps=c.rms_norm_eps) if c.qk_norm else nn.Identity()

        self.q_norm, self.k_norm, self.q_norm_moe_gen, self.k_norm_moe_gen = norm(), norm(), norm(), norm()
        self.fuse = False

    def forward(self, x, route: _Route, cos, sin, attn_mask, past: KV | None = None,
                batch: int | None = None, segments: list[tuple[int, int, bool]] | None = None,
                key_starts: list[int] | None = None) -> tuple[torch.Tensor, KV]:
        """x: the rows of one packed sequence (L, D), or of `batch` sequences of equal length (B L, D), whose cos /
        sin are then (B, L, head_dim), attn_mask (B, L, P + L) and past (B, kv_heads, P, head_dim) each.
        `segments` / `key_starts` replace the mask by what it means (see `attend`)."""
        single = batch is None
        B = 1 if single else batch
        R = x.shape[0]
        L = R // B
        q = route(x, self.q_proj, self.q_proj_moe_gen).view(R, self.num_heads, self.head_dim)
        k = route(x, self.k_proj, self.k_proj_moe_gen).view(R, self.num_kv_heads, self.head_dim)
        v = route(x, self.v_proj, self.v_proj_moe_gen).view(R, self.num_kv_heads, self.head_dim)
        q = route(q, self.q_norm, self.q_norm_moe_gen).view(B, L, self.num_heads, self.head_dim)
        k = route(k, self.k_norm, self.k_norm_moe_gen).view(B, L, self.num_kv_heads, self.head_dim)
        v = v.view(B, L, self.num_kv_heads, self.head_dim)
        if single:  # one sequence is a batch of one: the same arithmetic
            cos, sin = cos[None], sin[None]
            past = None if past is None else (past[0][None], past[1][None])
            attn_mask = None if attn_mask is None else attn_mask[None]
        q, k = fused(_rope, q, k, cos, sin) if self.fuse and q.device.type in FUSE_ON else _rope(q, k, cos, sin)

        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, kv_heads, L, head_dim): the cache's layout
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        groups = self.num_heads // self.num_kv_heads
        # KV heads repeated (as the official training path does) rather than SDPA's enable_gqa, which not every masked
        # SDPA kernel takes
        kk = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        vv = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        out = attend(q.transpose(1, 2), kk, vv, attn_mask, segments, key_starts)
        out = out.transpose(1, 2).reshape(R, self.num_heads * self.head_dim)
        return route(out, self.o_proj, self.o_proj_moe_gen), ((k[0], v[0]) if single else (k, v))


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: BagelConfig, qwen: Qwen2Config):
        super().__init__()
        d, eps = cfg.llm.hidden_size, cfg.llm.rms_norm_eps
        self.self_attn = MoTAttention(cfg)
        self.mlp, self.mlp_moe_gen = MLP(qwen), MLP(qwen)
        self.input_layernorm, self.input_layernorm_moe_gen = RMSNorm(d, eps=eps), RMSNorm(d, eps=eps)
        self.post_attention_layernorm = RMSNorm(d, eps=eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(d, eps=eps)

    def forward(self, x, route: _Route, cos, sin, attn_mask, past: KV | None = None, batch: int | None = None,
                segments=None, key_starts=None) -> tuple[torch.Tensor, KV]:
        h = route(x, self.input_layernorm, self.input_layernorm_moe_gen)
        h, kv = self.self_attn(h, route, cos, sin, attn_mask, past, batch, segments, key_starts)
        x = x + h
        h = route(x, lambda t: self.mlp(self.post_attention_layernorm(t)),
                  lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)))
        return x + h, kv


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: BagelConfig, qwen: Qwen2Config):
        super().__init__()
        c = cfg.llm
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, qwen) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=qwen)  # inv_freq is a non-persistent buffer: not saved


class LanguageModel(nn.Module):
    """`language_model` of the official tree: `.model` (Qwen2 + MoT) and an untied `.lm_head`."""

    def __init__(self, cfg: BagelConfig, qwen: Qwen2Config):
        super().__init__()
        self.model = Qwen2MoTModel(cfg, qwen)
        self.lm_head = nn.Linear(cfg.llm.hidden_size, cfg.llm.vocab_size, bias=False)


# ---------------------------------------------------------------- SigLIP NaViT


class VitEmbeddings(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        v = cfg.vit
        # a Linear over flattened (row, col, channel) patches: the official checkpoint stores the patch conv in this
        # layout (its `convert_conv2d_to_linear`), so NaViT images of any shape are one matmul
        self.patch_embedding = nn.Linear(v.num_channels * v.patch_size ** 2, v.hidden_size)
        self.position_embedding = nn.Embedding((v.image_size // v.patch_size) ** 2, v.hidden_size)

    def forward(self, pixel_values, position_ids):
        return self.patch_embedding(pixel_values) + self.position_embedding(position_ids)


class VitEncoder(nn.Module):
    def __init__(self, siglip: SiglipVisionConfig, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(siglip) for _ in range(n_layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: BagelConfig, siglip: SiglipVisionConfig):
        super().__init__()
        self.embeddings = VitEmbeddings(cfg)
        self.encoder = VitEncoder(siglip, cfg.vit_layers)
        self.post_layernorm = nn.LayerNorm(cfg.vit.hidden_size, eps=cfg.vit.layer_norm_eps)


class VitModel(nn.Module):
    """`vit_model` of the official tree (its `SiglipVisionModel` wraps one `vision_model`, no pooling head)."""

    def __init__(self, cfg: BagelConfig, siglip: SiglipVisionConfig):
        super().__init__()
        self.vision_model = VisionTransformer(cfg, siglip)


# ---------------------------------------------------------------- glue


class MLPConnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim)
        self.act = ACT2FN[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PositionEmbedding(nn.Module):
    """A frozen 2-D sin-cos table; a Parameter (not a buffer), as the official code has it, so it is saved."""

    def __init__(self, max_per_side: int, dim: int):
        super().__init__()
        self.max_per_side = max_per_side
        self.pos_embed = nn.Parameter(torch.zeros(max_per_side ** 2, dim), requires_grad=False)

    def reset_parameters(self) -> None:
        if not self.pos_embed.is_meta:
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[1], self.max_per_side))

    def forward(self, position_ids):
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedding: sinusoids of t (flow time in [0, 1], not scaled by 1000) -> MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoids(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, as DiT
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoids(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


# ---------------------------------------------------------------- the whole network


class BagelNet(nn.Module):
    """BAGEL's weights and the computations on one packed sequence. Its `state_dict()` has the official checkpoint's
    names and shapes; `torch.device("meta")` builds it without memory."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.llm
        qwen = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                           num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
                           max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                           rope_theta=c.rope_theta, tie_word_embeddings=False)
        v = cfg.vit
        siglip = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                    num_hidden_layers=cfg.vit_layers, num_attention_heads=v.num_attention_heads,
                                    num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                                    hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
                                    attention_dropout=v.attention_dropout)
        siglip._attn_implementation = "sdpa"

        self.language_model = LanguageModel(cfg, qwen)
        # understanding: ViT -> connector, plus a sin-cos table of the patch grid
        self.vit_model = VitModel(cfg, siglip)
        self.connector = MLPConnector(v.hidden_size, c.hidden_size, cfg.connector_act)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, c.hidden_size)
        # generation: packed latents <-> hidden, flow time, a sin-cos table of the latent grid
        self.time_embedder = TimestepEmbedder(c.hidden_size)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, c.hidden_size)
        self.llm2vae = nn.Linear(c.hidden_size, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, c.hidden_size)
        self.init_weights()

    # ---- weights

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random weights as the official model starts: Qwen2's normal(0, initializer_range) for linear and embedding
        weights with zero biases, norms at one, the sin-cos tables, and `llm2vae` at zero (so a fresh generation
        head predicts zero velocity)."""
        std = self.cfg.llm.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, (Qwen2RMSNorm, nn.LayerNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, PositionEmbedding):
                m.reset_parameters()
        self.llm2vae.weight.zero_()
        self.llm2vae.bias.zero_()

    def fuse_kernels(self, on: bool = True) -> None:
        """On a GPU, the LLM's norms, rotary embedding and SiLU-multiply through torch.compile (`fused`); the
        weights and the arithmetic are the same. Off (the default): eager everywhere."""
        for m in self.language_model.modules():
            if isinstance(m, (RMSNorm, MLP, MoTAttention)):
                m.fuse = on

    def restore_rope(self, device: str | torch.device = "cpu") -> None:
        """RoPE's tables are non-persistent buffers: a network built on the meta device and then loaded
        (`load_state_dict(assign=True)`) or materialised (`to_empty`) has none. Rebuild them on `device`."""
        lm = self.language_model.model
        lm.rotary_emb = type(lm.rotary_emb)(config=lm.rotary_emb.config).to(device)

    # ---- the LLM

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) token ids -> (n, D)."""
        return self.language_model.model.embed_tokens(ids)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, D) final hidden states -> (n, V)."""
        return self.language_model.lm_head(hidden)

    def forward_packed(self, embeds: torch.Tensor, position_ids: torch.Tensor, gen_mask: torch.Tensor,
                       attn_mask: torch.Tensor | None, past_kv: list[KV] | None = None, return_kv: bool = False,
                       segments: list[tuple[int, int, bool]] | None = None):
        """The MoT LLM over one packed sequence.

        embeds (L, D); position_ids (L,) RoPE positions (see the module docstring); gen_mask (L,) bool, True where a
        token uses the generation weights (latent tokens); attn_mask (L, P + L) bool, True where query i may attend
        key j, the P keys of `past_kv` first, or None where every query attends every key. A row with no True gives
        NaN (softmax over nothing).

        past_kv: per layer (k, v), each (kv_heads, P, head_dim), RoPE applied, as returned by an earlier call.
        Returns hidden (L, D) after the final norm chosen per token (`norm` / `norm_moe_gen`); with return_kv, also
        the per-layer (k, v) over P + L keys. `segments` in place of attn_mask: (start, end, causal) row ranges,
        the same visibility as the mask with the flash kernels wherever a range is an image block (`attend`).
        """
        lm = self.language_model.model
        route = _Route(gen_mask, embeds.device)
        cos, sin = lm.rotary_emb(embeds, position_ids[None])
        cos, sin = cos[0], sin[0]
        x, kvs = embeds, []
        for i, layer in enumerate(lm.layers):
            x, kv = layer(x, route, cos, sin, attn_mask, None if past_kv is None else past_kv[i], segments=segments)
            kvs.append(kv)
        x = route(x, lm.norm, lm.norm_moe_gen)
        return (x, kvs) if return_kv else x

    def forward_batch(self, embeds: torch.Tensor, position_ids: torch.Tensor, gen_mask: torch.Tensor,
                      attn_mask: torch.Tensor | None, past_kv: list[KV] | None = None,
                      key_starts: list[int] | None = None, return_kv: bool = False):
        """`forward_packed` over B sequences of one length L at once (the sampler's CFG branches): embeds (B, L, D),
        position_ids and gen_mask (B, L), attn_mask (B, L, P + L) or None, past_kv per layer (k, v) each
        (B, kv_heads, P, head_dim); `key_starts` in place of a mask: sequence b's cache is left-padded to P and
        its keys start at key_starts[b]. Returns hidden (B, L, D); with return_kv, also the per-layer (k, v) over
        P + L keys, each (B, kv_heads, P + L, head_dim)."""
        B, L, D = embeds.shape
        lm = self.language_model.model
        route = _Route(gen_mask.reshape(-1), embeds.device)
        cos, sin = lm.rotary_emb(embeds, position_ids)
        x, kvs = embeds.reshape(B * L, D), []
        for i, layer in enumerate(lm.layers):
            x, kv = layer(x, route, cos, sin, attn_mask, None if past_kv is None else past_kv[i], B,
                          key_starts=key_starts)
            kvs.append(kv)
        x = route(x, lm.norm, lm.norm_moe_gen).view(B, L, D)
        return (x, kvs) if return_kv else x

    # ---- understanding: images through the ViT

    def vit_patchify(self, image, max_side: int | None = None):
        """A PIL image -> (pixel_values, position_ids, (rows, cols)) for `embed_vit`, sides at most `max_side`
        (default: the ViT's image size, 980 for BAGEL-7B-MoT)."""
        v = self.cfg.vit
        return vit_patchify(image, max_side or v.image_size, patch_size=v.patch_size,
                            max_num_patch_per_side=self.cfg.vit_max_num_patch_per_side)

    def vit_position_ids(self, rows: int, cols: int) -> torch.Tensor:
        return flattened_position_ids_extrapolate(rows, cols, self.cfg.vit_max_num_patch_per_side)

    def embed_vit(self, pixel_values: torch.Tensor, position_ids: torch.Tensor,
                  seqlens: list[int] | None = None) -> torch.Tensor:
        """ViT patches (n, C*p*p) with their position ids (n,) -> LLM embeddings (n, D): SigLIP (each image attends
        only to itself; `seqlens` splits n among several packed images, default one), post-LayerNorm, connector, plus
        `vit_pos_embed`."""
        vm = self.vit_model.vision_model
        x = vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype), position_ids)
        mask = None
        if seqlens is not None and len(seqlens) > 1:
            image = torch.repeat_interleave(torch.arange(len(seqlens), device=x.device),
                                            torch.tensor(seqlens, device=x.device))
            mask = (image[:, None] == image[None, :])[None, None]
        x = x[None]
        for layer in vm.encoder.layers:
            x = layer(x, mask)
        x = vm.post_layernorm(x[0])
        return self.connector(x) + self.vit_pos_embed(position_ids)

    # ---- generation: packed VAE latents

    def latent_position_ids(self, h: int, w: int) -> torch.Tensor:
        """Ids into `latent_pos_embed` of an h x w grid of latent tokens (packed patches), row-major."""
        if self.cfg.interpolate_pos:
            return flattened_position_ids_interpolate(h, w, self.cfg.max_latent_size)
        return flattened_position_ids_extrapolate(h, w, self.cfg.max_latent_size)

    def embed_latents(self, packed: torch.Tensor, timestep: torch.Tensor | float,
                      pos_ids: torch.Tensor) -> torch.Tensor:
        """Packed noisy latents (n, latent_channels*p*p) at flow time `timestep` ((n,) or one value; 0 is clean,
        1 is noise) -> (n, D): vae2llm + time embedding + latent_pos_embed. Also R blocks at once: (R, n, C) with
        one time per block ((R,) or one value) -> (R, n, D)."""
        t = torch.as_tensor(timestep, dtype=torch.float32, device=packed.device).reshape(-1)
        x = self.vae2llm(packed.to(self.vae2llm.weight.dtype))
        # one time per block (the sampler, training): its embedding once, broadcast over the block's rows
        te = self.time_embedder(t)
        return x + (te[:, None] if packed.ndim == 3 else te) + self.latent_pos_embed(pos_ids)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, D) final hidden states of latent tokens -> (n, latent_channels*p*p), the flow's velocity
        (noise - data)."""
        return self.llm2vae(hidden)
