"""A small decoder-only transformer over one shared vocabulary of text and image tokens.

Pre-LayerNorm blocks, learned absolute positions, tied input/output embeddings, and a preallocated
KV cache for batched decoding. Positions are given explicitly so that left-padded prompts line up
(every row of a batch decodes its image at the same step) while each row keeps the positions it
was trained with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from configs.loader import Strict


class TransformerConfig(Strict):
    vocab_size: int = 512
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    max_len: int = 192
    dropout: float = 0.0
    # Factorised image-token embeddings: ids >= n_text are image tokens whose embedding (tied with the
    # output layer) is the sum of two factor embeddings (shape mask, colour); 0 = plain table.
    n_text: int = 0
    n_factor_a: int = 0
    n_factor_b: int = 0


class KVCache:
    """Per-layer key/value buffers of shape (B, H, max_len, dh); `length` positions are filled."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        self.k = [torch.empty(batch, n_heads, max_len, head_dim, device=device, dtype=dtype)
                  for _ in range(n_layers)]
        self.v = [torch.empty(batch, n_heads, max_len, head_dim, device=device, dtype=dtype)
                  for _ in range(n_layers)]
        self.length = 0
        self.key_mask: torch.Tensor | None = None  # (B, max_len) bool: which cached keys are real

    def index_select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding the given rows (e.g. one image prefix per question)."""
        new = KVCache.__new__(KVCache)
        new.k = [k.index_select(0, rows) for k in self.k]
        new.v = [v.index_select(0, rows) for v in self.v]
        new.length = self.length
        new.key_mask = None if self.key_mask is None else self.key_mask.index_select(0, rows)
        return new


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.mlp_ratio * d)
        self.fc2 = nn.Linear(cfg.mlp_ratio * d, d)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, D = x.shape
        H = self.n_heads
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q = q.view(B, T, H, D // H).transpose(1, 2)
        k = k.view(B, T, H, D // H).transpose(1, 2)
        v = v.view(B, T, H, D // H).transpose(1, 2)
        if cache is not None:
            s = cache.length
            cache.k[layer][:, :, s:s + T] = k
            cache.v[layer][:, :, s:s + T] = v
            k = cache.k[layer][:, :, :s + T]
            v = cache.v[layer][:, :, :s + T]
        if cache is not None:
            # decoding: plain matmuls on views of the cache (SDPA would copy the whole cache every step)
            att = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(D // H))
            if attn_mask is not None:
                att = att.masked_fill(~attn_mask, float("-inf"))
            y = torch.matmul(torch.softmax(att, dim=-1), v)
        else:
            drop = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(y)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.n_text:
            n_img = cfg.vocab_size - cfg.n_text
            self.tok = nn.Embedding(cfg.n_text, cfg.d_model)
            self.fac_a = nn.Embedding(cfg.n_factor_a, cfg.d_model)
            self.fac_b = nn.Embedding(cfg.n_factor_b, cfg.d_model)
            self.register_buffer("fac_a_idx", torch.zeros(n_img, dtype=torch.long))
            self.register_buffer("fac_b_idx", torch.zeros(n_img, dtype=torch.long))
        else:
            self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        for b in self.blocks:  # scaled residual projections (GPT-2)
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
            nn.init.normal_(b.fc2.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def set_factors(self, fa, fb) -> None:
        self.fac_a_idx.copy_(torch.as_tensor(fa, dtype=torch.long))
        self.fac_b_idx.copy_(torch.as_tensor(fb, dtype=torch.long))

    def embedding_matrix(self) -> torch.Tensor:
        """(vocab, d): text rows, then image rows as sums of their factor embeddings.

        Under inference mode (no grad) the matrix is cached, keyed on the parameters' versions."""
        if not self.cfg.n_text:
            return self.tok.weight
        grad = torch.is_grad_enabled()
        if not grad:
            key = (self.tok.weight._version, self.fac_a.weight._version, self.fac_b.weight._version,
                   self.tok.weight.data_ptr(), self.tok.weight.device)
            if getattr(self, "_emb_key", None) == key:
                return self._emb_cache
        img = self.fac_a(self.fac_a_idx) + self.fac_b(self.fac_b_idx)
        W = torch.cat([self.tok.weight, img], 0)
        if not grad:
            self._emb_key, self._emb_cache = key, W
        else:
            self._emb_key = None
        return W

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        p = self.tok.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_heads, self.cfg.max_len,
                       self.cfg.d_model // self.cfg.n_heads, device or p.device, dtype or p.dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, key_mask: torch.Tensor | None = None,
                last_only: bool = False, vocab_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits (B, T, V) for `tokens` (B, T).

        Without a cache: plain causal attention over right-padded rows (padding sits after the real
        tokens, so it never influences them). With a cache: the T new tokens attend to the cached ones
        and causally to each other; `key_mask` (B, T) marks which new tokens are real keys (False for
        left padding); masks of earlier calls are remembered in the cache.
        """
        B, T = tokens.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        W = self.embedding_matrix()
        x = F.embedding(tokens, W) + self.pos(positions)
        attn_mask = None
        is_causal = cache is None
        if cache is not None:
            s = cache.length
            if key_mask is not None or cache.key_mask is not None:
                if cache.key_mask is None:
                    cache.key_mask = torch.ones(B, self.cfg.max_len, dtype=torch.bool, device=tokens.device)
                if key_mask is not None:
                    cache.key_mask[:, s:s + T] = key_mask
                else:
                    cache.key_mask[:, s:s + T] = True
            if T > 1 or cache.key_mask is not None:
                causal = torch.ones(T, s + T, dtype=torch.bool, device=tokens.device).tril(diagonal=s)
                if cache.key_mask is not None:
                    attn_mask = causal[None, None] & cache.key_mask[:, None, None, :s + T]
                    # a fully masked row (a pad query) would give NaN: let it see itself
                    eye = torch.zeros(T, s + T, dtype=torch.bool, device=tokens.device)
                    eye[torch.arange(T), s + torch.arange(T, device=tokens.device)] = True
                    attn_mask = attn_mask | eye[None, None]
                else:
                    attn_mask = causal[None, None]
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn_mask, is_causal, cache, i)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        if vocab_range is not None:  # logits of a slice of the vocabulary only (decoding)
            W = W[vocab_range[0]:vocab_range[1]]
        return F.linear(self.ln_f(x), W)
