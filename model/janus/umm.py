"""JanusUMM: transformers' JanusForConditionalGeneration (Janus-Pro) behind the model protocol.

Every role through one parameter set:
- generate: the prompt in Janus's conversation format + <begin_of_image>, 576 VQ codes sampled by the rollout
  engine (model/janus/rollout.py: CFG rows in one batch, static KV cache, CUDA graphs on GPU), decoded by the VQ
  decoder. Per-sample seeds; the same (prompt, seed, params) gives the same image.
- reflect: the same with the flawed image's VQ codes in the prefix (image-conditioned image generation).
- judge / answer / propose: text generation through the understanding path (SigLIP features in place of
  <image_placeholder> tokens) with the conversation template; the judge writes its analysis and a JSON score,
  parsed robustly (model/prompts.py), an unparsed answer is a Judgement with parse_ok False and no score.
- training (model/protocol.py `TrainableModel`): a loss per CPR kind (`loss_terms`, one forward per kind) -
  generation: cross-entropy over the image's VQ codes through `generation_head` (transformers has no such loss);
  caption and judgement: the language-model loss on the answer, given the image and the question; reflection:
  image-conditioned image-token cross-entropy. `preference_logprobs`: the chosen and rejected images' code
  log-probabilities, for DPO. The objectives that combine them are tasks/objectives.py.
Weights are safetensors only (one model.safetensors, as the checkpoint registry wants); trust_remote_code is off.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from configs.loader import Strict
from model.janus import text as T
from model.janus.rollout import ImageRollout
from model.ids import checkpoint_id, checkpoint_id_of_file
from model.registry import resolve_dtype, to_device
from model.protocol import ROLES, CPRExample, Judgement, LossTerm, guide, sampling_policy

WEIGHTS = "model.safetensors"
SETTINGS = "janus_umm.json"
IMAGE_KINDS = ("generation", "reflection")
TEXT_KINDS = ("caption", "judgement", "question")


class Settings(Strict):
    """How the backend runs (not part of the weights); `model.settings` in a cycle recipe overrides these."""

    sampler: Literal["hash", "torch"] = "hash"
    image_batch: int = Field(64, ge=1, description="images per rollout-engine call")
    kv_cache: Literal["model", "fp8"] = Field(
        "model", description="rollout KV cache: the model's dtype, or fp8 e4m3 with per-vector scales (about half "
        "the bytes read per decoding step; changes some sampled tokens, see docs/janus.md)")
    text_batch: int = Field(16, ge=1, description="sequences per text-generation batch")
    propose_tokens: int = Field(40, ge=1)
    answer_tokens: int = Field(24, ge=1)
    judge_tokens: int = Field(64, ge=1, description="tokens of the judge's analysis")
    judge_mode: Literal["constrained", "free"] = Field(
        "constrained", description="constrained: free analysis, then the score read from the digits' "
        "probabilities (always parses); free: the whole JSON sampled greedily and parsed")
    cfg_scale: float = 5.0
    temperature: float = 1.0
    train_vision: bool = Field(False, description="train the SigLIP encoder too (the VQ model is always frozen)")
    loss_weights: dict[str, float] = Field(default_factory=dict, description="per-kind weights (default 1)")


def _check_lengths(**lists) -> None:
    lens = {k: len(v) for k, v in lists.items()}
    if len(set(lens.values())) > 1:
        raise ValueError(f"batched arguments differ in length: {lens}")


def janus_config(overrides: dict, tokenizer=None):
    """A JanusConfig from plain fields (the recipe's `model.janus_config`), fitted to the tokenizer's specials."""
    from transformers import JanusConfig

    cfg = JanusConfig(**json.loads(json.dumps(overrides)))
    if tokenizer is not None:
        ids = T.special_ids(tokenizer)
        cfg.image_token_id = ids.image
        if cfg.text_config.vocab_size < len(tokenizer):
            raise ValueError(f"text_config.vocab_size {cfg.text_config.vocab_size} < tokenizer size {len(tokenizer)}")
        cfg.text_config.pad_token_id = ids.pad
        cfg.text_config.bos_token_id = ids.bos
        cfg.text_config.eos_token_id = ids.eos
    return cfg


class JanusUMM:
    roles = frozenset(ROLES)
    caption_templates = T.CAPTION_TEMPLATES

    def __init__(self, net, tokenizer, settings: Settings | None = None, model_id: str | None = None):
        self.net = net
        self.tok = tokenizer
        self.settings = settings or Settings()
        self.ids = T.special_ids(tokenizer)
        self._model_id = model_id
        self._engine: ImageRollout | None = None
        # training speed (configure_training): the cross-entropy chunk, the frozen VQ's codes of images already
        # seen (id -> (image, codes): the image is held, so its id cannot be reused), what is in force
        self._loss_chunk = 0
        self._codes: dict[int, tuple[Image.Image, torch.Tensor]] | None = None
        self.train_speed: dict[str, Any] = {"compile": False, "loss_chunk": 0}
        self._fit_generation_config()
        self.net.model.vqmodel.requires_grad_(False)
        if not self.settings.train_vision:
            self.net.model.vision_model.requires_grad_(False)
            self.net.model.aligner.requires_grad_(False)
        self.net.eval()

    # ------------------------------------------------------------------ construction and storage
    @classmethod
    def random(cls, config: dict, device: str = "cpu", dtype: str | torch.dtype = "auto", seed: int = 0,
               settings: Settings | dict | None = None) -> "JanusUMM":
        """Random weights of the configured shapes, with a local byte-level tokenizer (nothing is downloaded)."""
        from transformers import JanusForConditionalGeneration

        tok = T.byte_tokenizer()
        cfg = janus_config(config, tok)
        dt = resolve_dtype(dtype, device)
        torch.manual_seed(seed)
        with torch.device(device):
            net = JanusForConditionalGeneration(cfg)
        net.to(dt)
        digest = hashlib.sha256(json.dumps({"config": config, "seed": seed}, sort_keys=True).encode()).hexdigest()
        st = settings if isinstance(settings, Settings) else Settings.model_validate(settings or {})
        return cls(net, tok, st, model_id=f"random-{digest[:10]}")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "auto",
                        settings: dict | None = None) -> "JanusUMM":
        """From a directory written by save_pretrained / a transformers Janus checkpoint, or a hub id.
        trust_remote_code stays off: Janus is native to transformers."""
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        dt = resolve_dtype(dtype, device)
        net = JanusForConditionalGeneration.from_pretrained(str(path), dtype=dt, trust_remote_code=False,
                                                            use_safetensors=True)
        net.to(device)
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        data: dict = {}
        p = Path(path)
        if (p / SETTINGS).is_file():
            data = json.loads((p / SETTINGS).read_text()).get("settings", {})
        data.update(settings or {})
        model_id = checkpoint_id_of_file(p / WEIGHTS) if (p / WEIGHTS).is_file() else None
        return cls(net, tok, Settings.model_validate(data), model_id=model_id)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """model.safetensors (one file, in `dtype`, default the weights' own), config, tokenizer, settings."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        sd = self.net.state_dict()
        if dtype is not None:
            sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        self.net.save_pretrained(str(d), state_dict=sd, max_shard_size="1000GB")
        self.tok.save_pretrained(str(d))
        (d / SETTINGS).write_text(json.dumps({"backend": "janus", "settings": self.settings.model_dump()}, indent=1))
        for n in os.listdir(d):  # the registry refuses pickles: transformers writes none, keep it that way
            if n.endswith((".bin", ".pt", ".pth", ".pkl")):
                raise RuntimeError(f"{d / n}: a pickle file was written")
        self._model_id = checkpoint_id_of_file(d / WEIGHTS)
        return d

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            from safetensors.torch import save

            sd = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
            self._model_id = checkpoint_id(save(sd))
        return self._model_id

    def weights_changed(self) -> None:
        self._model_id = None

    @property
    def device(self) -> torch.device:
        return self.net.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.lm_head.weight.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def parameters(self):
        return self.net.parameters()

    def train(self, mode: bool = True) -> "JanusUMM":
        self.net.train(mode)
        return self

    def _fit_generation_config(self) -> None:
        """What transformers' image `generate` reads from the generation config (real checkpoints ship it)."""
        gc = self.net.generation_config
        gc.bos_token_id = self.ids.bos
        gc.pad_token_id = self.ids.pad
        gc.eos_token_id = self.ids.eos
        kw = dict(getattr(gc, "generation_kwargs", None) or {})
        kw.setdefault("boi_token_id", self.ids.boi)
        gc.generation_kwargs = kw

    @property
    def engine(self) -> ImageRollout:
        if self._engine is None:
            self._engine = ImageRollout(self.net, kv_cache=self.settings.kv_cache)
        return self._engine

    @property
    def n_image_tokens(self) -> int:
        return self.net.config.vision_config.num_image_tokens

    @property
    def image_size(self) -> int:
        return int(self.net.config.vision_config.image_size)

    # ------------------------------------------------------------------ tokens and pixels
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def gen_ids(self, prompt: str) -> list[int]:
        return [self.ids.bos] + self.encode(T.GEN_TEMPLATE.format(prompt=prompt)) + [self.ids.boi]

    def uncond_ids(self, ids: list[int]) -> list[int]:
        """transformers' unconditional row: every token but BOS and <begin_of_image> becomes the pad token."""
        keep = {self.ids.bos, self.ids.boi}
        return [t if t in keep else self.ids.pad for t in ids]

    def und_ids(self, question: str, assistant_prefix: str = "") -> list[int]:
        s = T.SPECIALS
        img = s["boi"] + s["image"] * self.n_image_tokens + s["eoi"]
        return [self.ids.bos] + self.encode(T.UND_TEMPLATE.format(image=img, question=question) + assistant_prefix)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1]: Janus's image processors normalise with mean = std = 0.5 for SigLIP and VQ."""
        S = self.image_size
        arr = np.stack([np.asarray(im.convert("RGB").resize((S, S), Image.BICUBIC), dtype=np.float32)
                        for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
        return x.to(self.device, self.dtype)

    @torch.no_grad()
    def image_codes(self, images: list[Image.Image]) -> torch.Tensor:
        """VQ codes (B, n_image_tokens) of images (the VQ model is frozen). While training (`configure_training`)
        each image is encoded once: a training image drawn again costs no VQ pass and no pixel conversion."""
        if self._codes is None:
            return self._encode_codes(images)
        new = list({id(im): im for im in images if id(im) not in self._codes}.values())
        if new:
            for im, c in zip(new, self._encode_codes(new)):
                self._codes[id(im)] = (im, c)
        return torch.stack([self._codes[id(im)][1] for im in images])

    def _encode_codes(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for s in range(0, len(images), 32):
            px = self.pixels(images[s:s + 32])
            out.append(self.net.model.vqmodel.encode(px).image_tokens.view(px.shape[0], -1))
        return torch.cat(out)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> list[Image.Image]:
        # fixed chunks (the last padded): convolution algorithms depend on the batch shape, so an image's pixels
        # must not depend on how many other images were decoded with it
        out, k = [], 8
        for s in range(0, codes.shape[0], k):
            c = codes[s:s + k].to(self.device)
            n = c.shape[0]
            if n < k:
                c = torch.cat([c, c[:1].expand(k - n, -1)])
            x = self.net.decode_image_tokens(c).float()[:n]
            x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
            out += [Image.fromarray(a) for a in x]
        return out

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.net.get_input_embeddings()(torch.tensor(ids, device=self.device))

    def _embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net.prepare_embeddings_for_image_generation(codes.to(self.device))

    def reflect_parts(self, prompt: str, uncond: bool = False) -> tuple[list[int], list[int]]:
        """Token ids around the flawed image's codes: (before, after). The prefix is
        before + <boi> + codes + <eoi> + after (after ends with <begin_of_image>)."""
        before = [self.ids.bos] + self.encode("<|User|>: ") + [self.ids.boi]
        after = [self.ids.eoi] + self.encode("\n" + T.REFLECT_INSTRUCTION.format(prompt=prompt)
                                             + "\n\n<|Assistant|>:") + [self.ids.boi]
        if uncond:
            keep = {self.ids.bos, self.ids.boi, self.ids.eoi}
            before = [t if t in keep else self.ids.pad for t in before]
            after = [t if t in keep else self.ids.pad for t in after]
        return before, after

    def _reflect_prefix(self, prompt: str, codes: torch.Tensor, uncond: bool = False) -> torch.Tensor:
        before, after = self.reflect_parts(prompt, uncond)
        return torch.cat([self._embed_ids(before), self._embed_codes(codes), self._embed_ids(after)])

    def _gen_prefix(self, prompt: str, uncond: bool = False) -> torch.Tensor:
        ids = self.gen_ids(prompt)
        return self._embed_ids(self.uncond_ids(ids) if uncond or not prompt else ids)

    def _gen_prefixes(self, prompts: list[str], uncond: bool = False) -> list[torch.Tensor]:
        """`_gen_prefix` of each prompt through one embedding lookup: one host-to-device copy per batch instead of
        one per prompt (each of which waits for the GPU to finish its queue)."""
        ids = [self.gen_ids(p) for p in prompts]
        ids = [self.uncond_ids(i) if uncond or not p else i for i, p in zip(ids, prompts)]
        x = torch.full((len(ids), max(map(len, ids))), self.ids.pad, dtype=torch.long)
        for r, i in enumerate(ids):
            x[r, :len(i)] = torch.tensor(i)
        emb = self.net.get_input_embeddings()(to_device(x, self.device))
        return [emb[r, :len(i)] for r, i in enumerate(ids)]

    # ------------------------------------------------------------------ image roles
    @torch.no_grad()
    def sample_codes(self, cond: list[torch.Tensor], uncond: list[torch.Tensor], seeds: list[int],
                     cfg_scales: list[float], temperature: float, top_k: int | None,
                     sampler: str | None = None) -> torch.Tensor:
        bs = self.settings.image_batch
        out = []
        for s in range(0, len(cond), bs):
            e = min(len(cond), s + bs)
            out.append(self.engine.sample(cond[s:e], uncond[s:e], seeds[s:e], cfg_scales[s:e], temperature, top_k,
                                          sampler=sampler or self.settings.sampler,
                                          pad_to=16 if self.device.type == "cuda" else 1))
        return torch.cat(out)

    def generate(self, prompts: list[str], seeds: list[int], cfg_scales: list[float],
                 temperature: float = 1.0, top_k: int | None = None) -> list[Image.Image]:
        _check_lengths(prompts=prompts, seeds=seeds, cfg_scales=cfg_scales)
        if not prompts:
            return []
        with torch.no_grad():
            cond = [self._gen_prefix(p) for p in prompts]
            uncond = [self._gen_prefix(p, uncond=True) for p in prompts]
            codes = self.sample_codes(cond, uncond, seeds, cfg_scales, temperature, top_k)
        return self.decode_codes(codes)

    def reflect(self, prompts: list[str], images: list[Image.Image], seeds: list[int],
                cfg_scales: list[float], temperature: float = 1.0, top_k: int | None = None) -> list[Image.Image]:
        _check_lengths(prompts=prompts, images=images, seeds=seeds, cfg_scales=cfg_scales)
        if not prompts:
            return []
        with torch.no_grad():
            codes = self.image_codes(images)
            cond = [self._reflect_prefix(p, c) for p, c in zip(prompts, codes)]
            uncond = [self._reflect_prefix(p, c, uncond=True) for p, c in zip(prompts, codes)]
            out = self.sample_codes(cond, uncond, seeds, cfg_scales, temperature, top_k)
        return self.decode_codes(out)

    # ------------------------------------------------------------------ text roles
    def _banned(self) -> list[int]:
        return [self.ids.pad, self.ids.bos, self.ids.image, self.ids.boi, self.ids.eoi]

    @torch.no_grad()
    def _forward_text(self, seqs: list[list[int]], images: list[Image.Image] | None, cache=None):
        """Left-padded forward of token sequences (with SigLIP features where the image placeholders are)."""
        R, L = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((R, L), self.ids.pad, dtype=torch.long)
        am = torch.zeros((R, L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, L - len(s):] = torch.tensor(s)
            am[i, L - len(s):] = 1
        ids, am = ids.to(self.device), am.to(self.device)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        pv = self.pixels(images) if images is not None else None
        out = self.net(input_ids=ids, pixel_values=pv, attention_mask=am, position_ids=pos, use_cache=True,
                       logits_to_keep=1)
        return out, am, pos[:, -1]

    @torch.no_grad()
    def _generate_text(self, seqs: list[list[int]], images: list[Image.Image] | None, max_new: int,
                       seeds: list[int] | None = None, temperature: float = 0.0,
                       stop_chars: str = "") -> list[str]:
        """Greedy (seeds None) or sampled continuation of each sequence, stopping at EOS (or a stop char)."""
        res: list[str] = []
        bs = self.settings.text_batch
        banned = torch.tensor(self._banned(), device=self.device)
        for s in range(0, len(seqs), bs):
            e = min(len(seqs), s + bs)
            out, am, last = self._forward_text(seqs[s:e], images[s:e] if images is not None else None)
            cache = out.past_key_values
            R = e - s
            gens = None
            if seeds is not None and temperature > 0:
                gens = [torch.Generator(device=self.device).manual_seed(int(x) & 0x7FFF_FFFF_FFFF_FFFF)
                        for x in seeds[s:e]]
            toks = torch.zeros((R, max_new), dtype=torch.long, device=self.device)
            done = torch.zeros(R, dtype=torch.bool, device=self.device)
            logits = out.logits[:, -1].float()
            n = 0
            for t in range(max_new):
                logits[:, banned] = float("-inf")
                if gens is None:
                    nxt = logits.argmax(-1)
                else:
                    probs = torch.softmax(logits / temperature, -1)
                    q = torch.stack([torch.empty(probs.shape[-1], device=self.device).exponential_(1, generator=g)
                                     for g in gens])
                    nxt = (probs / q).argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, self.ids.eos), nxt)
                toks[:, t] = nxt
                n = t + 1
                done |= nxt == self.ids.eos
                if stop_chars:
                    for i in range(R):
                        if not done[i] and any(c in self.tok.decode([int(nxt[i])]) for c in stop_chars):
                            done[i] = True
                if bool(done.all()) or t == max_new - 1:
                    break
                am = torch.cat([am, torch.ones((R, 1), dtype=am.dtype, device=am.device)], 1)
                last = last + 1
                out = self.net(input_ids=nxt[:, None], attention_mask=am, position_ids=last[:, None],
                               past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[:, -1].float()
            for row in toks[:, :n].tolist():
                if self.ids.eos in row:
                    row = row[:row.index(self.ids.eos)]
                res.append(self.tok.decode(row, skip_special_tokens=True))
        return res

    def propose(self, categories: list[str], examples: list[list[str]], seeds: list[int],
                temperature: float = 0.8) -> list[str]:
        _check_lengths(categories=categories, examples=examples, seeds=seeds)
        seqs = []
        for c, ex in zip(categories, examples):
            q = T.PROPOSE_INSTRUCTION.format(category=c, examples="\n".join(f"- {e}" for e in ex[:3]))
            seqs.append([self.ids.bos] + self.encode(T.GEN_TEMPLATE.format(prompt=q) + " "))
        outs = self._generate_text(seqs, None, self.settings.propose_tokens, seeds, temperature, stop_chars="\n")
        return [o.strip().strip("-").strip().strip('"').strip() for o in outs]

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        _check_lengths(images=images, questions=questions)
        if not images:
            return []
        seqs = [self.und_ids(q, " ") for q in questions]
        return [o.strip() for o in self._generate_text(seqs, images, self.settings.answer_tokens)]

    def judge_prompt(self, prompt: str, rubric: Any = None) -> str:
        return T.JUDGE_INSTRUCTION.format(prompt=prompt, rubric=T.rubric_text(rubric))

    def judge(self, prompts: list[str], images: list[Image.Image], rubric: Any = None) -> list[Judgement]:
        _check_lengths(prompts=prompts, images=images)
        if not prompts:
            return []
        questions = [self.judge_prompt(p, rubric) for p in prompts]
        if self.settings.judge_mode == "free":
            raws = self._generate_text([self.und_ids(q, " ") for q in questions], images,
                                       self.settings.judge_tokens + 16)
        else:
            head = ' {"analysis": "'
            seqs = [self.und_ids(q, head) for q in questions]
            analyses = self._generate_text(seqs, images, self.settings.judge_tokens, stop_chars='"\n')
            analyses = [T.analysis_only(a) for a in analyses]
            scores = self._score_digits([s + self.encode(a + '", "score": ') for s, a in zip(seqs, analyses)],
                                        images)
            raws = [json.dumps({"analysis": a, "score": sc}) for a, sc in zip(analyses, scores)]
        return [T.judgement_of(raw) for raw in raws]

    @torch.no_grad()
    def _score_digits(self, seqs: list[list[int]], images: list[Image.Image]) -> list[int]:
        """The most likely score 0-10 after '"score": ', from the digit tokens' probabilities."""
        first = [self.encode(str(n)) for n in range(11)]
        digit_tok = [f[0] for f in first[:10]]
        scores: list[int] = []
        bs = self.settings.text_batch
        for s in range(0, len(seqs), bs):
            e = min(len(seqs), s + bs)
            out, _, _ = self._forward_text(seqs[s:e], images[s:e])
            lp = torch.log_softmax(out.logits[:, -1].float(), -1)[:, digit_tok]
            best = lp.argmax(-1).tolist()
            if len(first[10]) == 1:  # "10" is one token: a candidate of its own
                ten = torch.log_softmax(out.logits[:, -1].float(), -1)[:, first[10][0]]
                best = [10 if float(ten[i]) > float(lp[i, b]) else b for i, b in enumerate(best)]
            else:  # "1" then "0"?
                ones = [i for i, b in enumerate(best) if b == 1]
                if ones:
                    o2, _, _ = self._forward_text([seqs[s + i] + first[10][:1] for i in ones],
                                                  [images[s + i] for i in ones])
                    p0 = torch.softmax(o2.logits[:, -1].float(), -1)[:, first[10][1]]
                    for j, i in enumerate(ones):
                        if float(p0[j]) > 0.5:
                            best[i] = 10
            scores += best
        return scores

    # ------------------------------------------------------------------ training
    def _image_hidden(self, prefixes: list[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """Generation-head logits (B, N, V) predicting each code from its prefix and the codes before it."""
        return self.net.model.generation_head(self._image_states(prefixes, codes))

    def _image_states(self, prefixes: list[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, N, D) that predict each code (the generation head's input).

        Right-padded: row i is [prefix i, the codes' embeddings but the last], then zeros up to the batch's length,
        at positions 0..T-1. Causal attention keeps the trailing pads invisible to every real token, so no attention
        mask is needed: a mask would have SDPA leave its flash kernel and transformers build a 4-D mask per forward."""
        B, N = codes.shape
        lens = [p.shape[0] for p in prefixes]
        L = max(lens)
        T = train_length(L + N - 1, self.device)
        img = self._embed_codes(codes[:, :-1])
        D = img.shape[-1]
        # Flat indices into the (B * T) batch, built on the host: one scatter of every row's tokens, one gather of
        # the states at l_i - 1 .. l_i + N - 2; one pinned copy, so nothing waits for the GPU.
        start = torch.arange(B)[:, None] * T
        ln = torch.tensor(lens)[:, None]
        pre = (start + torch.arange(L))[torch.arange(L) < ln]  # row-major: the order of the prefixes' cat
        idx = to_device(torch.cat([pre, (start + ln + torch.arange(N - 1)).reshape(-1),
                                   (start + ln - 1 + torch.arange(N)).reshape(-1)]), self.device)
        src = torch.cat([p.to(img.dtype) for p in prefixes] + [img.reshape(-1, D)])
        x = img.new_zeros(B * T, D).index_copy(0, idx[:src.shape[0]], src).view(B, T, D)
        pos = torch.arange(T, device=self.device).expand(B, T)
        h = self.net.model.language_model(inputs_embeds=x, attention_mask=None, position_ids=pos,
                                          use_cache=False).last_hidden_state
        return h.reshape(B * T, D).index_select(0, idx[src.shape[0]:]).view(B, N, D)

    def image_ce(self, prefixes: list[torch.Tensor], codes: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """Mean cross-entropy of the codes. chunk > 0: the generation head and an fp32 cross-entropy run per
        `chunk` tokens under activation checkpointing, so no (B*N, V) logits tensor is kept for backward (about
        3.6 GB at 32 x 576 codes of 16k) at the price of recomputing the head's forward."""
        if chunk <= 0:
            logits = self._image_hidden(prefixes, codes)
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
        h = self._image_states(prefixes, codes).reshape(-1, self.net.config.text_config.hidden_size)
        y = codes.reshape(-1)
        head = self.net.model.generation_head

        def part(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(head(hc).float(), yc, reduction="sum")

        from torch.utils.checkpoint import checkpoint

        total = sum(checkpoint(part, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
                    for i in range(0, y.numel(), chunk))
        return total / y.numel()

    def image_logprob(self, prefixes: list[torch.Tensor], codes: torch.Tensor, per_token: bool = False
                      ) -> torch.Tensor:
        """Sum of log-probabilities of each image's codes given its prefix (B,), with grad; or each code's
        (B, codes per image) with `per_token`."""
        logits = self._image_hidden(prefixes, codes).float()
        lp = -F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")
        return lp if per_token else lp.sum(-1)

    def image_token_logprobs(self, examples: list[CPRExample]) -> torch.Tensor:
        """Under the sampler's policy (`sampling_policy`): guided by each image's CFG scale (an unconditional pass
        for those not at 1), divided by its temperature."""
        codes = self.image_codes([e.target_image for e in examples])
        temps, scales = zip(*(sampling_policy(e) for e in examples))
        cond = self._image_hidden([self._gen_prefix(e.input_text) for e in examples], codes).float()
        guided = [i for i, s in enumerate(scales) if s != 1.0]
        uncond = self._image_hidden([self._gen_prefix(examples[i].input_text, uncond=True) for i in guided],
                                    codes[guided]).float() if guided else None
        logits = guide(cond, uncond, list(scales), guided)
        logits = logits / torch.tensor(temps, device=logits.device)[:, None, None]
        return -F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")

    def text_ce(self, prompts: list[list[int]], targets: list[list[int]], images: list[Image.Image]) -> torch.Tensor:
        """Language-model loss on the answers (each target + EOS) given image + question, right-padded with no
        attention mask, as `_image_states`."""
        seqs = [p + t + [self.ids.eos] for p, t in zip(prompts, targets)]
        R, L = len(seqs), train_length(max(len(s) for s in seqs), self.device)
        ids = torch.full((R, L), self.ids.pad, dtype=torch.long)
        lab = torch.full((R, L), -100, dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, prompts)):
            ids[i, :len(s)] = torch.tensor(s)
            lab[i, len(p):len(s)] = torch.tensor(s[len(p):])
        ids, lab = to_device(ids, self.device), to_device(lab, self.device)
        out = self.net.model(input_ids=ids, pixel_values=self.pixels(images), attention_mask=None, use_cache=False)
        h = out.last_hidden_state[:, :-1]
        tgt = lab[:, 1:]
        sel = tgt != -100
        logits = self.net.lm_head(h[sel])
        return F.cross_entropy(logits.float(), tgt[sel])

    def _judgement_target(self, ex: CPRExample) -> tuple[str, str]:
        meta = ex.meta if isinstance(ex.meta, dict) else {}
        prompt = meta.get("prompt") or ex.input_text
        target = ex.target_text or ""
        if meta.get("score") is not None:
            target = json.dumps({"analysis": target, "score": int(meta["score"])})
        return self.judge_prompt(prompt, meta.get("rubric")), target

    def tokens_per_example(self, ex: CPRExample) -> int:
        """Tokens one example runs through the model (what post-training reports tokens/s from); a preference
        pair runs its chosen and its rejected image's generation sequences."""
        N = self.n_image_tokens
        if ex.kind == "preference":
            return 2 * (len(self.gen_ids(ex.input_text)) + N)
        if ex.kind in ("generation", "group"):
            return len(self.gen_ids(ex.input_text)) + N
        if ex.kind == "reflection":
            b, a = self.reflect_parts(ex.input_text)
            return len(b) + len(a) + 2 * N
        if ex.kind == "judgement":
            q, t = self._judgement_target(ex)
            return len(self.und_ids(q, " ")) + len(self.encode(t)) + 1
        return len(self.und_ids(ex.input_text or T.CAPTION_TEMPLATES[0], " ")) + len(self.encode(ex.target_text or "")) + 1

    def params_on_path(self, kind: str) -> int:
        """Parameters whose matrix products every token of a `kind` example runs through in training, so that
        6 x this x tokens is its training FLOPs (model/janus/bench.py counts the same): the Llama layers and final
        norm, and for image tokens (generation, reflection, preference pairs, group samples) the generation aligner
        and head. Embedding lookups, the language head on a text answer's few tokens and the frozen encoders'
        forward passes (SigLIP, VQ) are left out."""
        m = self.net.model
        n = sum(p.numel() for k, p in m.language_model.named_parameters() if not k.startswith("embed_tokens"))
        if kind in TEXT_KINDS:
            return n
        return n + sum(p.numel() for p in m.generation_aligner.parameters()) + \
            sum(p.numel() for p in m.generation_head.parameters())

    def configure_training(self, compile: bool, loss_chunk: int) -> dict[str, Any]:
        """Settings that make post-training faster, never change what it learns (the posttrain worker's
        `compile` and `loss_chunk`): each decoder layer of the language model through torch.compile (Inductor
        fuses the norms, rotary embedding and activations; a compiler that cannot take them falls back to eager
        with one warning), the generation head and its fp32 cross-entropy per `loss_chunk` tokens under
        activation checkpointing (`image_ce`; 0: whole), and each training image's VQ codes kept once encoded.
        Returns `train_speed`, the settings in force (it says so if compile later falls back)."""
        self._loss_chunk = int(loss_chunk)
        if self._codes is None:
            self._codes = {}
        self.train_speed.update(loss_chunk=self._loss_chunk)
        compile_layers(self.net.model.language_model.layers, compile, self.train_speed)
        return self.train_speed

    @property
    def default_loss_weights(self) -> dict[str, float]:
        """Per-kind weights from the backend settings (`Settings.loss_weights`), keyed by CPR kind (default 1)."""
        return dict(self.settings.loss_weights)

    def loss_terms(self, examples: list[CPRExample]) -> dict[str, LossTerm]:
        """Per CPR kind, in the order the kinds first appear in the batch: its mean token loss (one forward over
        the kind's examples, `kind_loss`) and its example count."""
        by: dict[str, list[CPRExample]] = {}
        for ex in examples:
            if ex.kind not in ("generation", "caption", "judgement", "reflection", "question"):
                raise ValueError(f"unknown CPR kind {ex.kind!r} (expected one of generation, caption, judgement, "
                                 "reflection)")
            by.setdefault(ex.kind, []).append(ex)
        return {kind: LossTerm(self.kind_loss(kind, exs), len(exs)) for kind, exs in by.items()}

    def kind_loss(self, kind: str, exs: list[CPRExample]) -> torch.Tensor:
        if kind == "generation":
            codes = self.image_codes([e.target_image for e in exs])
            return self.image_ce(self._gen_prefixes([e.input_text for e in exs]), codes, self._loss_chunk)
        if kind == "reflection":
            codes = self.image_codes([e.input_image for e in exs] + [e.target_image for e in exs])
            src, dst = codes[:len(exs)], codes[len(exs):]
            prefixes = [self._reflect_prefix(e.input_text, c, uncond=not e.input_text) for e, c in zip(exs, src)]
            return self.image_ce(prefixes, dst, self._loss_chunk)
        if kind == "judgement":
            qt = [self._judgement_target(e) for e in exs]
            return self.text_ce([self.und_ids(q, " ") for q, _ in qt], [self.encode(t) for _, t in qt],
                                [e.input_image for e in exs])
        # caption / question: the instruction (a caption template) and the answer
        return self.text_ce([self.und_ids(e.input_text or T.CAPTION_TEMPLATES[0], " ") for e in exs],
                            [self.encode(e.target_text or "") for e in exs], [e.input_image for e in exs])

    def preference_logprobs(self, examples: list[CPRExample]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(chosen, rejected, tokens per image): summed code log-probabilities of target_image and of rejected_image
        given input_text (B,), with grad; both images of every pair in one forward pass."""
        B = len(examples)
        codes = self.image_codes([e.target_image for e in examples] + [e.rejected_image for e in examples])
        prefixes = [self._gen_prefix(e.input_text) for e in examples] * 2
        lp = self.image_logprob(prefixes, codes)
        return lp[:B], lp[B:], codes.shape[1]


def train_length(n: int, device: torch.device) -> int:
    """A training batch's padded length for `n` tokens: on a GPU rounded up to a multiple of 16, since each new
    length compiles the layers and plans cuDNN's attention anew, and a batch's longest prompt varies."""
    m = 16 if device.type == "cuda" else 1
    return -(-n // m) * m


def compile_layers(layers, on: bool, state: dict[str, Any]) -> None:
    """Each layer through torch.compile (`on`), or eager again; `state['compile']` says which is in force.

    One compiled graph serves every layer (the same code, parameters as inputs), as in the training bench. A
    compiled call that raises before any compiled training call has run (no compiler toolchain, an operation
    Dynamo cannot take) turns every layer back to eager with one warning and runs eagerly, as the rollout engine
    does; after that, errors are not the compiler's and propagate."""
    for layer in layers:
        layer._compiled_call_impl = None  # nn.Module.compile's slot: None runs the module eagerly
    state.pop("compile_error", None)
    state["compile"] = bool(on)
    if not on:
        return
    trained = [False]  # a compiled call with grad has run (no-grad calls may run under an eager stance)

    def guard(layer, compiled):
        def call(*args, **kwargs):
            if trained[0]:
                return compiled(*args, **kwargs)
            try:
                out = compiled(*args, **kwargs)
            except torch.OutOfMemoryError:  # not the compiler's: eager would not fit either
                raise
            except Exception as exc:  # noqa: BLE001 - a compiler that cannot take the layer: run eagerly, say so
                msg = f"{type(exc).__name__}: {str(exc)[:300]}"
                warnings.warn(f"post-training: torch.compile of the language-model layers failed ({msg}); "
                              "training them eagerly", stacklevel=2)
                compile_layers(layers, False, state)
                state["compile_error"] = msg
                return layer._call_impl(*args, **kwargs)
            trained[0] = torch.is_grad_enabled()
            return out
        return call

    for layer in layers:
        layer.compile()
        layer._compiled_call_impl = guard(layer, layer._compiled_call_impl)


def is_janus_dir(directory: str | None) -> bool:
    if directory is None:
        return False
    p = Path(directory)
    if (p / SETTINGS).is_file():
        return True
    try:
        return json.loads((p / "config.json").read_text()).get("model_type") == "janus"
    except (OSError, ValueError):
        return False
