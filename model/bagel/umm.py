"""BagelUMM: BAGEL (UniCorn's base) behind the model protocol: every role through one Mixture-of-Transformers LLM.

- generate: the prompt as a text block, then an image block of packed VAE latents drawn by the rectified-flow Euler
  sampler (model/bagel/sampler.py) from per-sample seeded noise; text CFG against the same block with no text.
- reflect: the same, the flawed image in the context twice as BAGEL edits (clean VAE latents, then ViT patches);
  image CFG (`cfg_img_scale` > 1) against the context without the image.
- propose / answer / judge: text decoding through the understanding weights, images as ViT blocks; the judge writes
  UniCorn's JSON {"analysis", "score"}: free analysis, then the score read from the digits' probabilities
  (`judge_mode: constrained`, always parses) or the whole answer parsed (`free`, failures counted).
- training (`TrainableModel`): flow-matching MSE on the velocity (noise - x0) for generation and reflection,
  cross-entropy on the answer for caption and judgement, weighted as UniCorn (`ce_weight` 0.1: the text kinds'
  default weight); `preference_logprobs` gives Diffusion-DPO's implicit log-likelihoods (minus the velocity error
  summed over the latent, the same noise and time for the policy and its reference), so DPO's formula in
  tasks/objectives.py becomes Diffusion-DPO's.

Sequences follow the official layout (model/bagel/modeling.py): text blocks are <|im_start|> text <|im_end|> at
consecutive RoPE positions, causal; an image block is <|vision_start|> tokens <|vision_end|> at one position, full
attention inside, causal to what came before. Checkpoints are the official layout: llm_config.json,
vit_config.json, ema.safetensors (the network), ae.safetensors (FLUX's names), the tokenizer files; plus
bagel_net.json and bagel_umm.json (ours: the rest of the network config, the VAE config and the settings).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from configs.loader import Strict
from model.bagel import sampler as S
from model.bagel import vae as V
from model.bagel.config import BagelConfig
from model.bagel.modeling import BagelNet
from model.ids import checkpoint_id_of_file
from model import prompts as T
from model.protocol import ROLES, CPRExample, Judgement, LossTerm
from model.registry import resolve_dtype, to_device

WEIGHTS = "ema.safetensors"
AE = "ae.safetensors"
SETTINGS = "bagel_umm.json"
IMAGE_KINDS = ("generation", "reflection")
TEXT_KINDS = ("caption", "judgement", "question")
SPECIALS = {"bos": "<|im_start|>", "eos": "<|im_end|>", "soi": "<|vision_start|>", "eoi": "<|vision_end|>"}


class Settings(Strict):
    """How the backend runs (not part of the weights); `model.settings` in a recipe overrides these."""

    propose_tokens: int = Field(48, ge=1)
    answer_tokens: int = Field(24, ge=1)
    judge_tokens: int = Field(96, ge=1, description="tokens of the judge's analysis")
    judge_mode: Literal["constrained", "free"] = "constrained"
    text_batch: int = Field(16, ge=1, description="sequences decoded in lockstep (propose, answer, judge)")
    image_batch: int = Field(1, ge=1, description="images the sampler draws at once (their CFG branches in one "
                             "forward). 1: an image is the same whatever else is drawn; more: faster on a GPU, and "
                             "the bits may depend on the batch's composition")
    vit_max_side: int | None = Field(None, ge=14, description="ViT input side (default: the ViT's image size)")
    train_vision: bool = Field(False, description="train the SigLIP encoder too (the VAE is always frozen)")
    timestep_shift: float | None = Field(None, gt=0, description="training time shift (default: the network's)")
    loss_weights: dict[str, float] = Field(default_factory=lambda: {"caption": 0.1, "judgement": 0.1},
                                           description="per-kind weights: UniCorn's ce_weight 0.1 on text CE")
    compile: bool = Field(True, description="on a GPU, the LLM's norms, rotary embedding and SiLU-multiply fused by "
                          "torch.compile (the same arithmetic); off: eager")
    latent_cache_gib: float = Field(2.0, ge=0, description="host memory for the frozen VAE's posteriors of training "
                                    "target images, so each image is encoded once per process (0: encode every time)")


class Block:
    """One block of a packed sequence: its embeddings, per-token generation flags (on the host: the routing's
    indices are found there, with no sync), and whether it is an image (one RoPE position, full attention inside)
    or text (consecutive positions, causal)."""

    def __init__(self, embeds: torch.Tensor, gen: torch.Tensor, image: bool):
        self.embeds, self.gen, self.image = embeds, gen, image


def segments_of(blocks: list[Block]) -> list[tuple[int, int, bool]]:
    """(start, end, causal) rows of each block: what `layout`'s mask says, for `BagelNet`'s mask-free attention."""
    out, s = [], 0
    for blk in blocks:
        n = blk.embeds.shape[0]
        out.append((s, s + n, not blk.image))
        s += n
    return out


def layout(blocks: list[Block], start: int = 0, with_mask: bool = True):
    """(embeds, position_ids, gen_mask, attn_mask (L, L) or None, next position) of blocks packed in order."""
    dev = blocks[0].embeds.device
    pos, owner, causal = [], [], []
    p = start
    for b, blk in enumerate(blocks):
        n = blk.embeds.shape[0]
        if blk.image:
            pos += [p] * n
            p += 1
        else:
            pos += list(range(p, p + n))
            p += n
        owner += [b] * n
        causal += [not blk.image] * n
    L = len(pos)
    gen = torch.cat([b.gen.cpu() for b in blocks])
    if not with_mask:
        return torch.cat([b.embeds for b in blocks]), to_device(pos, dev, torch.long), gen, None, p
    owner_t = torch.tensor(owner)
    idx = torch.arange(L)
    same = owner_t[:, None] == owner_t[None, :]
    causal_t = torch.tensor(causal)
    # earlier blocks always; inside a block: everything for an image, the past for text
    mask = (owner_t[:, None] > owner_t[None, :]) | (same & (~causal_t[:, None] | (idx[:, None] >= idx[None, :])))
    return torch.cat([b.embeds for b in blocks]), to_device(pos, dev, torch.long), gen, to_device(mask, dev), p


def _marker_flags(n: int, gen: bool) -> torch.Tensor:
    """(n + 2,) host flags of an image block: its n tokens `gen`, its two markers understanding tokens."""
    flags = torch.zeros(n + 2, dtype=torch.bool)
    flags[1:-1] = gen
    return flags


class BagelUMM:
    roles = frozenset(ROLES)

    def __init__(self, net: BagelNet, vae, tokenizer, settings: Settings | None = None, model_id: str | None = None):
        self.net, self.vae, self.tok = net, vae, tokenizer
        self.settings = settings or Settings()
        self._posteriors: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # LRU: image digest -> VAE posterior
        self._posterior_bytes = 0
        self._digests: dict[int, tuple[weakref.ref, bytes]] = {}
        self.cfg: BagelConfig = net.cfg
        self.ids = {k: int(tokenizer.convert_tokens_to_ids(v)) for k, v in SPECIALS.items()}
        self._model_id = model_id
        self._preference_calls = 0
        self._latent_pos: dict[int, torch.Tensor] = {}
        self._marker_ids: dict[torch.device, torch.Tensor] = {}
        self._vit_tokens: dict[tuple, int] = {}

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self._settings = value
        self.net.fuse_kernels(value.compile)

    # ------------------------------------------------------------------ building, loading, saving
    @classmethod
    def random(cls, cfg: BagelConfig, vae_config: dict, tokenizer, device: str = "cpu", dtype: Any = "auto",
               seed: int = 0, settings: dict | None = None) -> "BagelUMM":
        """Random weights of the given shapes (no download). `llm2vae` starts at zero in the official init (a fresh
        model predicts no velocity); a random model is meant to draw, so it gets random weights there too."""
        torch.manual_seed(seed)
        net = BagelNet(cfg)
        with torch.no_grad():
            net.llm2vae.weight.normal_(0.0, cfg.llm.initializer_range)
        vae = V.build_vae(vae_config)
        dt = resolve_dtype(dtype, device)
        return cls(net.to(device, dt), vae.to(device).eval(), tokenizer, Settings.model_validate(settings or {}))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu", dtype: Any = "auto",
                        settings: dict | None = None) -> "BagelUMM":
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        d = Path(directory)
        meta = json.loads((d / SETTINGS).read_text()) if (d / SETTINGS).is_file() else {}
        cfg = BagelConfig.from_official_dir(d)
        with torch.device("meta"):
            net = BagelNet(cfg)
        state = load_file(str(d / WEIGHTS), device="cpu")
        net.load_state_dict(state, strict=True, assign=True)
        net.restore_rope()
        stray = [n for n, b in net.named_buffers() if b.is_meta]
        if stray:
            raise ValueError(f"{directory}: buffers {stray[:3]} were not restored from {WEIGHTS}")
        dt = resolve_dtype(dtype, device)
        vae = V.load_ae(d / AE, meta.get("vae_config", V.FLUX_VAE_CONFIG), device=device)
        tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
        s = Settings.model_validate({**meta.get("settings", {}), **(settings or {})})
        return cls(net.to(device, dt), vae, tok, s, model_id=checkpoint_id_of_file(d / WEIGHTS))

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.cfg.write_official(d)
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(d / WEIGHTS), metadata={"format": "pt"})
        V.save_ae(self.vae, d / AE)
        self.tok.save_pretrained(str(d))
        vae_config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        (d / SETTINGS).write_text(json.dumps({"settings": self.settings.model_dump(mode="json"),
                                              "vae_config": vae_config}, indent=1, sort_keys=True))
        self._model_id = checkpoint_id_of_file(d / WEIGHTS)
        return d

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            h = hashlib.sha256()
            for k, v in sorted(self.net.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().float().cpu().numpy().tobytes())
            self._model_id = "unsaved-" + h.hexdigest()[:8]
        return self._model_id

    def weights_changed(self) -> None:
        self._model_id = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def train(self, mode: bool = True) -> "BagelUMM":
        self.net.train(mode)
        self.net.vit_model.requires_grad_(self.settings.train_vision)
        self.vae.requires_grad_(False)
        return self

    # ------------------------------------------------------------------ blocks
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def text_block(self, text: str, open_answer: bool = False) -> Block:
        """<|im_start|> text <|im_end|>; `open_answer` adds the <|im_start|> that the answer follows."""
        ids = [self.ids["bos"]] + self.encode(text) + [self.ids["eos"]] + ([self.ids["bos"]] if open_answer else [])
        return self._ids_block(ids)

    def _ids_block(self, ids: list[int]) -> Block:
        t = to_device(ids, self.device, torch.long)
        return Block(self.net.embed_text(t), torch.zeros(len(ids), dtype=torch.bool), False)

    def _markers(self, inner: torch.Tensor, gen: bool) -> Block:
        return Block(self._with_markers(inner), _marker_flags(inner.shape[0], gen), True)

    def _with_markers(self, inner: torch.Tensor) -> torch.Tensor:
        """An image's embeddings (n, D), or R of them (R, n, D), between its start and end markers."""
        dev = inner.device
        if dev not in self._marker_ids:  # every block asks: the ids go to the device once
            self._marker_ids[dev] = torch.tensor([self.ids["soi"], self.ids["eoi"]], device=dev)
        ends = self.net.embed_text(self._marker_ids[dev])
        inner = inner.to(ends.dtype)
        if inner.ndim == 2:
            return torch.cat([ends[:1], inner, ends[1:]])
        R = inner.shape[0]
        return torch.cat([ends[:1].expand(R, 1, -1), inner, ends[1:].expand(R, 1, -1)], dim=1)

    def _latent_pos_ids(self, side: int) -> torch.Tensor:
        g = side // (self.cfg.vae_downsample * self.cfg.latent_patch_size)
        if g not in self._latent_pos:  # every sampler step asks again: build and copy it once
            self._latent_pos[g] = self.net.latent_position_ids(g, g).to(self.device)
        return self._latent_pos[g]

    def vit_block(self, image: Image.Image) -> Block:
        pv, pos, _ = self.net.vit_patchify(image.convert("RGB"), self.settings.vit_max_side)
        return self._markers(self.net.embed_vit(to_device(pv, self.device), to_device(pos, self.device)), gen=False)

    def latent_block(self, packed: torch.Tensor, t: torch.Tensor | float, side: int) -> Block:
        """Packed latents (n, C p p) of a side x side image at flow time t (0: clean)."""
        return self._markers(self.net.embed_latents(packed.to(self.device), t, self._latent_pos_ids(side)), gen=True)

    def clean_latents(self, images: list[Image.Image], side: int, generator: torch.Generator | None = None):
        """Images resized to side x side -> packed clean latents (B, n, C p p), as BAGEL encodes its inputs.

        The VAE is frozen, so the posterior of each image is kept (host memory, LRU, up to `latent_cache_gib`) and
        an image seen again (a training target, at every step that draws it) is only sampled from it, not encoded:
        at 1024 px the encoder costs about a third of a training step at 4-8 layers. Each draw is the same as
        encoding afresh with that generator; a posterior encoded in another batch may differ in its last bits
        (convolution algorithms depend on the batch's shape)."""
        def resized(im: Image.Image) -> Image.Image:
            return im.convert("RGB").resize((side, side), Image.BICUBIC)

        cap = int(self.settings.latent_cache_gib * 2**30)
        if cap <= 0:
            z = V.encode(self.vae, [resized(im) for im in images], generator=generator)
            return V.pack_latents(z.float(), self.cfg.latent_patch_size)
        keys = [(side, self._digest(im)) for im in images]
        todo = {k: im for k, im in zip(keys, images) if k not in self._posteriors}
        if todo:
            params = V.posterior(self.vae, [resized(im) for im in todo.values()]).cpu()
            pin = self.device.type == "cuda"  # pinned: sent back without a sync at every later draw
            for k, p in zip(todo, params):
                self._posteriors[k] = p.pin_memory() if pin else p.clone()
                self._posterior_bytes += p.numel() * p.element_size()
        params = torch.stack([to_device(self._posteriors[k], self.device) for k in keys])
        for k in keys:
            self._posteriors.move_to_end(k)
        while self._posterior_bytes > cap and len(self._posteriors) > len(set(keys)):
            _, old = self._posteriors.popitem(last=False)
            self._posterior_bytes -= old.numel() * old.element_size()
        z = V.sample_posterior(self.vae, params, generator=generator)
        return V.pack_latents(z.float(), self.cfg.latent_patch_size)

    def _digest(self, image: Image.Image) -> bytes:
        """The content digest of an image, kept per image object (a training target is drawn at many steps; hashing
        its pixels each time costs milliseconds of host time a step). An image object is taken as unchanged once
        seen: the examples never modify theirs."""
        key = id(image)  # PIL images are unhashable; a weak reference drops the entry with its image
        entry = self._digests.get(key)
        if entry is not None and entry[0]() is image:
            return entry[1]
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{image.mode} {image.size}".encode())
        h.update(image.tobytes())
        self._digests[key] = (weakref.ref(image, lambda _, k=key, d=self._digests: d.pop(k, None)), h.digest())
        return self._digests[key][1]

    # ------------------------------------------------------------------ generation
    def _side(self, sampling: S.FlowSampling) -> int:
        top = self.cfg.max_latent_size * self.cfg.vae_downsample * self.cfg.latent_patch_size
        if sampling.resolution > top:
            raise ValueError(f"resolution {sampling.resolution} exceeds this network's latent grid ({top} px)")
        return sampling.resolution

    @torch.no_grad()
    def _draw(self, contexts: list[list[Block]], uncond_text: list[list[Block]], uncond_img: list[list[Block]] | None,
              seeds: list[int], cfg_scales: list[float], sampling: S.FlowSampling) -> list[Image.Image]:
        side = self._side(sampling)
        g = side // (self.cfg.vae_downsample * self.cfg.latent_patch_size)
        dim = self.cfg.patch_latent_dim
        out: list[Image.Image] = []
        k = self.settings.image_batch
        for g0 in range(0, len(seeds), k):
            idx = range(g0, min(len(seeds), g0 + k))
            noise = torch.cat([torch.randn((1, g * g, dim), generator=torch.Generator().manual_seed(
                int(seeds[i]) & 0x7FFF_FFFF_FFFF_FFFF)) for i in idx])  # on CPU: the same on every device
            prefixes = [[self._prefix(contexts[i]) for i in idx], [self._prefix(uncond_text[i]) for i in idx],
                        [self._prefix(uncond_img[i]) for i in idx] if uncond_img is not None else None]

            memo: dict = {}  # the branches' stacked caches and positions, built once for the whole schedule

            def velocity(x, t, active, prefixes=prefixes, memo=memo):
                # the branches this step needs, for every image of the group, as one batch: one forward
                want = [0] + ([1] if bool(active.text.any()) else []) + ([2] if active.img and prefixes[2] else [])
                n = x.shape[0]
                v = self._velocities([p for j in want for p in prefixes[j]], x.repeat(len(want), 1, 1),
                                     t.repeat(len(want)), side, memo=memo.setdefault(tuple(want), {}))
                res = [None, None, None]
                for r, j in enumerate(want):
                    res[j] = v[r * n:(r + 1) * n]
                return tuple(res)

            x = S.sample(velocity, noise.to(self.device).float(), sampling, [float(cfg_scales[i]) for i in idx])
            out += V.decode(self.vae, V.unpack_latents(x, g, g, self.cfg.latent_patch_size))
        return out

    def _run(self, blocks: list[Block], return_kv: bool = False):
        """(hidden, kv or None, next position) of blocks packed as one sequence; the attention by segments, so image
        blocks keep the flash kernels (`BagelNet.forward_packed`)."""
        emb, pos, gen, _, nxt = layout(blocks, with_mask=False)
        out = self.net.forward_packed(emb, pos, gen, None, return_kv=return_kv, segments=segments_of(blocks))
        return (*out, nxt) if return_kv else (out, None, nxt)

    def _run_packed(self, sequences: list[list[Block]]) -> list[torch.Tensor]:
        """The hidden states of several sequences packed into one forward (each sees only itself, RoPE from 0 in
        each, as BAGEL's trainer packs): the layers run once over all their tokens."""
        parts, segs, offset = [], [], 0
        for blocks in sequences:
            parts.append(layout(blocks, with_mask=False))
            segs += [(s + offset, e + offset, c, offset) for s, e, c in segments_of(blocks)]
            offset += parts[-1][0].shape[0]
        h = self.net.forward_packed(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                    torch.cat([p[2] for p in parts]), None, segments=segs)
        return list(h.split([p[0].shape[0] for p in parts]))

    def _prefix(self, blocks: list[Block]):
        """(past_kv, next position) of a context, or (None, 0) for an empty one."""
        if not blocks:
            return None, 0
        _, kv, nxt = self._run(blocks, return_kv=True)
        return kv, nxt

    def _velocities(self, prefixes: list, x: torch.Tensor, t: torch.Tensor, side: int,
                    memo: dict | None = None) -> torch.Tensor:
        """(S, N, C): the velocity of latents x[s] (S, N, C) at time t[s] under context s (its KV cache; the
        caches left-padded to one length, each branch's attention from its own first key), in one batched
        forward. One latent row per context, or one row for all (the same image under every context). `memo`:
        kept across calls with the same contexts (a sampler's steps), so their caches are stacked once."""
        embeds = self._latent_rows(x, t, side)
        S, L = len(prefixes), embeds.shape[1]
        embeds = embeds.expand(S, L, -1)
        memo = {} if memo is None else memo
        if "past" not in memo:
            past, first, _ = self._stack_caches(prefixes)
            memo["past"] = past
            # the block sees its whole context: no mask, each branch from its own first key (flash kernels)
            memo["starts"] = first if any(first) else None
            memo["pos"] = to_device([start for _, start in prefixes], self.device, torch.long)
        gen = _marker_flags(L - 2, True)
        h = self.net.forward_batch(embeds, memo["pos"][:, None].expand(S, L), gen[None].expand(S, L), None,
                                   memo["past"], key_starts=memo["starts"])
        return self.net.velocity(h[:, 1:-1]).float()

    def _latent_rows(self, x: torch.Tensor, t: torch.Tensor, side: int) -> torch.Tensor:
        """(R, N + 2, D): `latent_block`'s embeddings of the latents x[r] at times t[r], all rows at once."""
        return self._with_markers(self.net.embed_latents(x.to(self.device), t, self._latent_pos_ids(side)))

    def generate(self, prompts: list[str], seeds: list[int], cfg_scales: list[float], **sampling: Any) -> list[Image.Image]:
        s = S.FlowSampling.model_validate(sampling)
        ctx = [[self.text_block(p)] for p in prompts]
        return self._draw(ctx, [[] for _ in prompts], None, seeds, cfg_scales, s)

    def reflect_blocks(self, prompt: str, image: Image.Image, side: int, generator=None) -> list[Block]:
        clean = self.clean_latents([image], side, generator)[0]
        return [self.latent_block(clean.to(self.dtype), 0.0, side), self.vit_block(image),
                self.text_block(T.REFLECT_INSTRUCTION.format(prompt=prompt))]

    def reflect(self, prompts: list[str], images: list[Image.Image], seeds: list[int], cfg_scales: list[float],
                **sampling: Any) -> list[Image.Image]:
        s = S.FlowSampling.model_validate(sampling)
        side = self._side(s)
        with torch.no_grad():
            ctx = [self.reflect_blocks(p, im, side, torch.Generator().manual_seed(int(sd)))
                   for p, im, sd in zip(prompts, images, seeds)]
        # text CFG drops the instruction, image CFG drops the image (as BAGEL edits)
        return self._draw(ctx, [c[:2] for c in ctx], [c[2:] for c in ctx], seeds, cfg_scales, s)

    # ------------------------------------------------------------------ understanding
    def _stack_caches(self, prefixes: list) -> tuple[list | None, list[int], int]:
        """Per-sequence KV caches left-padded to one length P: (per layer (k, v) each (B, kv_heads, P, head_dim),
        each sequence's first real key, P)."""
        lens = [0 if kv is None else kv[0][0].shape[1] for kv, _ in prefixes]
        P = max(lens)
        if not P:
            return None, [0] * len(lens), 0
        h, d = self.cfg.llm.num_key_value_heads, self.cfg.llm.head_dim
        past = []
        for layer in range(len(self.net.language_model.model.layers)):
            ks, vs = [], []
            for (kv, _), n in zip(prefixes, lens):
                k = kv[layer][0] if kv is not None else torch.zeros((h, 0, d), device=self.device, dtype=self.dtype)
                v = kv[layer][1] if kv is not None else torch.zeros((h, 0, d), device=self.device, dtype=self.dtype)
                ks.append(torch.cat([k.new_zeros((h, P - n, d)), k], 1))
                vs.append(torch.cat([v.new_zeros((h, P - n, d)), v], 1))
            past.append((torch.stack(ks), torch.stack(vs)))
        return past, [P - n for n in lens], P

    @torch.no_grad()
    def _decode(self, blocks: list[Block], max_new: int, seed: int | None = None, temperature: float = 0.0,
                stop: str = "") -> str:
        return self._decode_many([blocks], max_new, [seed], temperature, stop)[0]

    @torch.no_grad()
    def _decode_many(self, contexts: list[list[Block]], max_new: int, seeds: list[int | None] | None = None,
                     temperature: float = 0.0, stop: str = "") -> list[str]:
        """Greedy (or seeded, sampled) text after each context, `text_batch` sequences decoded in lockstep: each
        context is prefilled alone, the caches left-padded into one batch, one forward per new token for all."""
        out: list[str] = []
        seeds = seeds or [None] * len(contexts)
        banned = [self.ids["bos"], self.ids["soi"], self.ids["eoi"]]
        for g0 in range(0, len(contexts), self.settings.text_batch):
            group = range(g0, min(len(contexts), g0 + self.settings.text_batch))
            prefixes, logits = [], []
            for i in group:
                h, kv, nxt = self._run(contexts[i], return_kv=True)
                prefixes.append((kv, nxt))
                logits.append(self.net.lm_logits(h[-1:]).float()[0])
            past, starts, _ = self._stack_caches(prefixes)
            nxt = torch.tensor([p for _, p in prefixes], device=self.device)
            rngs = [torch.Generator().manual_seed(int(seeds[i])) if seeds[i] is not None and temperature > 0
                    else None for i in group]
            logits = torch.stack(logits)
            toks: list[list[int]] = [[] for _ in group]
            done = [False] * len(group)
            for _ in range(max_new):
                logits[:, banned] = float("-inf")
                # one read-back a step for the whole group (a row's own read would wait on the GPU once per row)
                greedy = logits.argmax(-1).tolist()
                host = logits.cpu() if any(r is not None for r in rngs) else None
                step = []
                for b, rng in enumerate(rngs):
                    if rng is None:
                        tok = greedy[b]
                    else:
                        tok = int(torch.multinomial(torch.softmax(host[b] / temperature, -1), 1, generator=rng))
                    if not done[b]:
                        if tok == self.ids["eos"]:
                            done[b] = True
                        else:
                            toks[b].append(tok)
                            done[b] = bool(stop) and any(c in self.tok.decode([tok]) for c in stop)
                    step.append(tok)
                if all(done):
                    break
                e = self.net.embed_text(torch.tensor(step, device=self.device))[:, None]
                h, past = self.net.forward_batch(e, nxt[:, None], torch.zeros((len(step), 1), dtype=torch.bool,
                                                                             device=self.device),
                                                 None, past, key_starts=starts if any(starts) else None,
                                                 return_kv=True)
                nxt = nxt + 1
                logits = self.net.lm_logits(h[:, 0]).float()
            out += [self.tok.decode(t, skip_special_tokens=True) for t in toks]
        return out

    def propose(self, categories: list[str], examples: list[list[str]], seeds: list[int],
                temperature: float = 0.8) -> list[str]:
        contexts = [[self.text_block(T.PROPOSE_INSTRUCTION.format(
            category=c, examples="\n".join(f"- {e}" for e in ex[:3])), open_answer=True)]
            for c, ex in zip(categories, examples)]
        texts = self._decode_many(contexts, self.settings.propose_tokens, list(seeds), temperature, stop="\n")
        return [t.strip().strip("-").strip().strip('"').strip() for t in texts]

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        contexts = [[self.vit_block(im), self.text_block(q, open_answer=True)] for im, q in zip(images, questions)]
        return [t.strip() for t in self._decode_many(contexts, self.settings.answer_tokens)]

    def judge_prompt(self, prompt: str, rubric: Any = None) -> str:
        return T.JUDGE_INSTRUCTION.format(prompt=prompt, rubric=T.rubric_text(rubric))

    def judge(self, prompts: list[str], images: list[Image.Image], rubric: Any = None) -> list[Judgement]:
        contexts = [[self.vit_block(im), self.text_block(self.judge_prompt(p, rubric), open_answer=True)]
                    for p, im in zip(prompts, images)]
        if self.settings.judge_mode == "free":
            raws = self._decode_many(contexts, self.settings.judge_tokens + 16)
        else:
            head = '{"analysis": "'
            analyses = self._decode_many([c + [self._ids_block(self.encode(head))] for c in contexts],
                                         self.settings.judge_tokens, stop='"\n')
            analyses = [T.analysis_only(a) for a in analyses]
            scores = [self._score_digits(c + [self._ids_block(self.encode(f'{head}{a}", "score": '))])
                      for c, a in zip(contexts, analyses)]
            raws = [json.dumps({"analysis": a, "score": sc}) for a, sc in zip(analyses, scores)]
        return [T.judgement_of(raw) for raw in raws]

    @torch.no_grad()
    def _score_digits(self, blocks: list[Block]) -> int:
        """The likeliest score 0-10 after '"score": ', from the digit tokens' probabilities."""
        lp = torch.log_softmax(self.net.lm_logits(self._run(blocks)[0][-1:]).float()[0], -1)
        cands = {n: self.encode(str(n)) for n in range(11)}
        best, best_lp = 0, float("-inf")
        for n, toks in cands.items():
            if len(toks) == 1 and float(lp[toks[0]]) > best_lp:  # a multi-token "10" is read as its "1"
                best, best_lp = n, float(lp[toks[0]])
        return best

    # ------------------------------------------------------------------ training
    def _flow_time(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """BAGEL's training times: sigmoid of a normal draw, then the time shift."""
        t = torch.sigmoid(torch.randn(n, generator=generator))
        s = self.settings.timestep_shift or self.cfg.timestep_shift
        return s * t / (1 + (s - 1) * t)

    def _flow_errors(self, contexts: list[list[Block]], targets: list[Image.Image], side: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) mean squared velocity error of each target image given its context, with grad."""
        x0 = self.clean_latents(targets, side, generator).to(self.device)
        # with no generator (training) the noise is drawn where it is used; a generator (Diffusion-DPO's shared
        # noise, tests) draws on the host, the same on every device
        noise = (torch.randn(x0.shape, device=self.device) if generator is None else
                 to_device(torch.randn(x0.shape, generator=generator), self.device))
        t = to_device(self._flow_time(len(targets), generator), self.device)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        blks = [self.latent_block(xt[i].to(self.dtype), t[i], side) for i in range(len(contexts))]
        hs = self._run_packed([ctx + [blk] for ctx, blk in zip(contexts, blks)])
        errs = [((self.net.velocity(h[-blk.embeds.shape[0] + 1:-1]).float() - (noise[i] - x0[i])) ** 2).mean()
                for i, (h, blk) in enumerate(zip(hs, blks))]
        return torch.stack(errs)

    def _train_side(self) -> int:
        return self.cfg.max_latent_size * self.cfg.vae_downsample * self.cfg.latent_patch_size

    def _image_context(self, ex: CPRExample, side: int) -> list[Block]:
        if ex.kind == "reflection":
            blocks = self.reflect_blocks(ex.input_text, ex.input_image, side)
            return blocks if ex.input_text else blocks[:2]  # CFG dropout: no instruction
        return [self.text_block(ex.input_text)] if ex.input_text else []

    def _judgement_target(self, ex: CPRExample) -> tuple[str, str]:
        meta = ex.meta if isinstance(ex.meta, dict) else {}
        target = ex.target_text or ""
        if meta.get("score") is not None:
            target = json.dumps({"analysis": target, "score": int(meta["score"])})
        return self.judge_prompt(meta.get("prompt") or ex.input_text, meta.get("rubric")), target

    def _text_ce(self, exs: list[CPRExample]) -> torch.Tensor:
        """Token-mean cross-entropy of each answer (and its <|im_end|>) given the image and the question."""
        answers, sequences = [], []
        for ex in exs:
            q, tgt = (self._judgement_target(ex) if ex.kind == "judgement"
                      else (ex.input_text or T.CAPTION_TEMPLATES[0], ex.target_text or ""))
            answers.append(self.encode(tgt) + [self.ids["eos"]])
            sequences.append([self.vit_block(ex.input_image), self.text_block(q, open_answer=True),
                              self._ids_block(answers[-1])])
        hs = self._run_packed(sequences)
        logits = torch.cat([self.net.lm_logits(h[-len(a) - 1:-1]) for h, a in zip(hs, answers)]).float()
        target = torch.tensor([t for a in answers for t in a], device=self.device)
        return F.cross_entropy(logits, target)

    def kind_loss(self, kind: str, exs: list[CPRExample]) -> torch.Tensor:
        if kind in IMAGE_KINDS:
            side = self._train_side()
            return self._flow_errors([self._image_context(e, side) for e in exs], [e.target_image for e in exs],
                                     side).mean()
        return self._text_ce(exs)

    @property
    def default_loss_weights(self) -> dict[str, float]:
        return dict(self.settings.loss_weights)

    def loss_terms(self, examples: list[CPRExample]) -> dict[str, LossTerm]:
        by: dict[str, list[CPRExample]] = {}
        for ex in examples:
            if ex.kind not in IMAGE_KINDS + TEXT_KINDS:
                raise ValueError(f"unknown CPR kind {ex.kind!r} (expected one of generation, caption, judgement, "
                                 "reflection)")
            by.setdefault(ex.kind, []).append(ex)
        return {kind: LossTerm(self.kind_loss(kind, exs), len(exs)) for kind, exs in by.items()}

    def preference_logprobs(self, examples: list[CPRExample]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Diffusion-DPO's implicit log-likelihoods: minus the velocity error summed over each image's latent
        (B,), chosen and rejected drawn with the same noise and time. The noise comes from a generator seeded by
        the call count, so the policy and its frozen reference (each called once per step, tasks/objectives.py)
        see the same draws."""
        self._preference_calls += 1
        side = self._train_side()
        g = torch.Generator().manual_seed(self._preference_calls)
        state = g.get_state()
        ctx = [self._image_context(e, side) for e in examples]
        chosen = self._flow_errors(ctx, [e.target_image for e in examples], side, g)
        g.set_state(state)
        rejected = self._flow_errors(ctx, [e.rejected_image for e in examples], side, g)
        n = (side // (self.cfg.vae_downsample * self.cfg.latent_patch_size)) ** 2 * self.cfg.patch_latent_dim
        return -chosen * n, -rejected * n, n

    def image_token_logprobs(self, examples: list[CPRExample]) -> torch.Tensor:
        raise NotImplementedError("posttrain.objective 'grpo' needs per-step log-densities of the flow sampler "
                                  "(Flow-GRPO), which the BAGEL backend does not give yet: use 'sft' or 'dpo'")

    def params_on_path(self, kind: str) -> int:
        """Parameters whose matrix products every LLM token of a `kind` example runs through in training (MFU counts
        6 x this x tokens): one expert's layers and final norm (a token takes the understanding or the generation
        weights, which have the same shapes), and for image kinds `vae2llm` / `llm2vae`. The frozen ViT's and
        VAE's forward passes, the time embedding (once per image) and the language head on an answer's few
        tokens are left out."""
        lm = self.net.language_model.model
        n = sum(p.numel() for k, p in lm.named_parameters() if k.startswith("layers.") and "moe_gen" in k)
        n += lm.norm_moe_gen.weight.numel()
        if kind in TEXT_KINDS:
            return n
        return n + sum(p.numel() for m in (self.net.vae2llm, self.net.llm2vae) for p in m.parameters())

    def configure_training(self, compile: bool, loss_chunk: int) -> dict[str, Any]:
        """The posttrain worker's speed-only settings: `compile` becomes `Settings.compile` (the fused norms, rotary
        and SiLU-multiply on a GPU; a compiler that fails falls back to eager with one warning); the VAE's
        posteriors of the training images are kept (`Settings.latent_cache_gib`). `loss_chunk` is not used: the
        flow loss has no vocabulary-sized head, and the text kinds' head runs on the answers' tokens only."""
        self.settings = self.settings.model_copy(update={"compile": bool(compile)})
        return self.train_speed

    @property
    def train_speed(self) -> dict[str, Any]:
        """The training speed settings in force (compile says false once the compiler has fallen back)."""
        from model.bagel import modeling

        return {"compile": self.settings.compile and not modeling._EAGER, "loss_chunk": 0,
                "latent_cache_gib": self.settings.latent_cache_gib}

    def tokens_per_example(self, ex: CPRExample) -> int:
        side = self._train_side()
        n_img = (side // (self.cfg.vae_downsample * self.cfg.latent_patch_size)) ** 2 + 2
        key = (side, self.settings.vit_max_side)
        if key not in self._vit_tokens:  # the worker counts every example of every step: patchify a blank once
            self._vit_tokens[key] = self.net.vit_patchify(Image.new("RGB", (side, side)), key[1])[0].shape[0] + 2
        n_vit = self._vit_tokens[key]
        text = len(self.encode(ex.input_text or "")) + 2
        if ex.kind == "preference":
            return 2 * (text + n_img)
        if ex.kind in ("generation", "group"):
            return text + n_img
        if ex.kind == "reflection":
            return 2 * n_img + n_vit + text
        return n_vit + text + len(self.encode(ex.target_text or "")) + 1


def is_bagel_dir(directory: str | None) -> bool:
    if directory is None:
        return False
    p = Path(directory)
    return (p / WEIGHTS).is_file() and (p / "llm_config.json").is_file()
