"""EmbeddedUMM: the tiny unified multimodal model behind the model protocol.

One transformer, one set of weights, every role: propose, generate, judge, answer, reflect; and the training
side (model/protocol.py `TrainableModel`): a token-mean loss per CPR kind from one forward pass over the whole
batch (`loss_terms`), and the image log-probabilities DPO compares (`preference_logprobs`). The objectives that
combine them are tasks/objectives.py.
Weights are safetensors only (transformer + image codebook in one file) with a JSON config beside them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from configs.loader import Strict
from model.embedded import sequences as S
from model.embedded.tokenizer import PatchCodebook, Vocab
from model.embedded.transformer import Transformer, TransformerConfig
from model.ids import checkpoint_id
from model.protocol import ROLES, CPRExample, Judgement, LossTerm, guide, sampling_policy

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
BASE_DIR = Path(__file__).parent / "base"
# the CPR kind each loss kind (sequences.KINDS) trains under: judgement trains the question kind (the judge's own
# yes/no answers), so weights given for judgement apply to it
CPR_KIND_OF = {"question": "judgement"}


class SamplingDefaults(Strict):
    temperature: float = 1.0
    top_k: int | None = None
    cfg_scale: float = 1.0  # this small model's images break down at CFG >= 3 (see base/metrics.json)
    batch_size: int = 256  # prompts per decoding batch (CFG doubles the rows)
    judge_batch: int = 256  # images per judging batch
    max_text_tokens: int = 40


class EmbeddedModelConfig(Strict):
    """The model's architecture and defaults (configs/model/*.yaml)."""

    transformer: TransformerConfig = TransformerConfig()
    image_size: int = 32
    n_masks: int = 192  # image tokenizer: exact 4x4 foreground masks in the codebook
    sampling: SamplingDefaults = SamplingDefaults()
    # per-kind loss weights, each kind's loss a mean over its target tokens
    loss_weights: dict[str, float] = {"generation": 1.0, "question": 1.0, "caption": 0.5,
                                      "propose": 0.3, "reflection": 0.5}


def _words(text: str) -> list[str]:
    from model.world import tokenize
    return list(tokenize(text))


def detokenize(words: list[str]) -> str:
    return " ".join(words)


def _seed_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)


def uniforms(seed: int, steps: int) -> torch.Tensor:
    """One uniform per decoding step from a per-sample generator: the same seed gives the same draws
    whatever else the batch holds (inverse-CDF sampling)."""
    return torch.rand(steps, generator=_seed_gen(seed), dtype=torch.float64)


class EmbeddedUMM:
    roles = frozenset(ROLES)
    caption_templates = S.CAPTION_TEMPLATES  # instructions the model was pretrained to caption under

    def __init__(self, net: Transformer, codebook: PatchCodebook, vocab: Vocab,
                 config: EmbeddedModelConfig, model_id: str | None = None):
        self.net = net
        self.codebook = codebook
        self.vocab = vocab
        self.config = config
        self._model_id = model_id
        self.net.eval()

    # ------------------------------------------------------------------ construction and storage
    @classmethod
    def create(cls, config: EmbeddedModelConfig, codebook: PatchCodebook, words: list[str],
               categories: list[str]) -> "EmbeddedUMM":
        vocab = Vocab(words, categories, codebook.k)
        tcfg = config.transformer.model_copy(update={
            "vocab_size": vocab.size, "n_text": vocab.text_size, "n_factor_a": codebook.n_masks + 1,
            "n_factor_b": codebook.n_colors + codebook.n_backgrounds + 1})
        config = config.model_copy(update={"transformer": tcfg, "n_masks": codebook.n_masks})
        net = Transformer(tcfg)
        net.set_factors(*codebook.factors())
        return cls(net, codebook, vocab, config)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        sd = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
              for k, v in self.net.state_dict().items()}
        sd.update(self.codebook.tensors())
        return sd

    def weights_bytes(self) -> bytes:
        return st_save(self.state_tensors(), metadata={"format": "pt"})

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = checkpoint_id(self.weights_bytes())
        return self._model_id

    def weights_changed(self) -> None:
        """Call after training steps: the checkpoint id is recomputed from the new weights."""
        self._model_id = None

    def config_json(self) -> dict:
        return {"model_type": "embedded-umm", "config": self.config.model_dump(mode="json"),
                "vocab": self.vocab.to_json()}

    def save_pretrained(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        data = self.weights_bytes()
        (d / WEIGHTS).write_bytes(data)
        (d / CONFIG).write_text(json.dumps(self.config_json(), indent=1) + "\n")
        self._model_id = checkpoint_id(data)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, device: str = "cpu") -> "EmbeddedUMM":
        d = Path(directory) if directory is not None else BASE_DIR
        if not (d / WEIGHTS).is_file():
            raise FileNotFoundError(f"{d}: no {WEIGHTS} (an embedded checkpoint directory holds {WEIGHTS} + {CONFIG})")
        meta = json.loads((d / CONFIG).read_text())
        config = EmbeddedModelConfig.model_validate(meta["config"])
        vocab = Vocab.from_json(meta["vocab"])
        data = (d / WEIGHTS).read_bytes()
        tensors = st_load(data)
        codebook = PatchCodebook.from_tensors(
            {k: tensors.pop(k) for k in list(tensors) if k.startswith("codebook.")}, config.image_size)
        net = Transformer(config.transformer)
        net.load_state_dict(tensors)
        net.to(device)
        return cls(net, codebook, vocab, config, checkpoint_id(data))

    @property
    def device(self) -> torch.device:
        return self.net.tok.weight.device

    def num_params(self) -> int:
        return self.net.num_params()

    # ------------------------------------------------------------------ tokens
    def text_ids(self, text: str, limit: int = 48) -> list[int]:
        """Word ids of a text (unknown words -> <unk>), at most `limit` of them."""
        return self.vocab.text_ids(_words(text or ""))[:limit]

    def image_codes(self, images: list[Image.Image]) -> np.ndarray:
        return self.codebook.encode(images)

    # ------------------------------------------------------------------ decoding core
    def _decode(self, prefixes: list[list[int]], steps: int, lo: int, hi: int,
                noise: torch.Tensor | None, temperature: float, top_k: int | None,
                uncond: list[list[int]] | None = None, cfg_scales: list[float] | None = None,
                bias: torch.Tensor | None = None, stop: int | None = None) -> torch.Tensor:
        """Sample `steps` tokens from [lo, hi) after each left-padded prefix, with a KV cache.

        noise: (B, steps) uniforms per row (None = greedy). With `uncond`, rows are doubled for
        classifier-free guidance: logits = u + s * (c - u). `bias` (hi-lo,) or (steps, hi-lo) adds -inf
        to banned ids.
        Returns (B, steps) ids relative to lo.
        Kept in one function: it is a single KV-cache decode loop (prefill, then guide, sample and feed
        one token per step) whose cache, positions and stop mask are shared by every step; splitting it
        would pass that state across calls in the hot path.
        """
        dev = self.device
        B = len(prefixes)
        rows = prefixes + (uncond or [])
        L = max(len(r) for r in rows)
        R = len(rows)
        if L + steps > self.net.cfg.max_len:
            raise ValueError(f"prefix of {L} + {steps} tokens exceeds max_len {self.net.cfg.max_len}")
        ids = torch.full((R, L), self.vocab.PAD, dtype=torch.long)
        pos = torch.zeros((R, L), dtype=torch.long)
        km = torch.zeros((R, L), dtype=torch.bool)
        lens = torch.tensor([len(r) for r in rows])
        for i, r in enumerate(rows):
            ids[i, L - len(r):] = torch.tensor(r)
            pos[i, L - len(r):] = torch.arange(len(r))
            km[i, L - len(r):] = True
        ids, pos, km, lens = ids.to(dev), pos.to(dev), km.to(dev), lens.to(dev)
        padded = bool((lens < L).any())
        cache = self.net.new_cache(R)
        scales = None
        if uncond:
            scales = torch.tensor(cfg_scales, dtype=torch.float32, device=dev)[:, None]
        if noise is not None:
            noise = noise.to(dev)
        out = torch.zeros((B, steps), dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        with torch.inference_mode():
            logits = self.net(ids, pos, cache, km if padded else None, last_only=True,
                              vocab_range=(lo, hi))[:, -1].float()
            for t in range(steps):
                if uncond:
                    c, u = logits[:B], logits[B:]
                    lg = u + scales * (c - u)
                else:
                    lg = logits
                if bias is not None:
                    lg = lg + (bias[t] if bias.dim() == 2 else bias)
                if noise is None or temperature <= 0:
                    tok = lg.argmax(-1)
                else:
                    lg = lg / temperature
                    if top_k is not None and top_k < lg.shape[-1]:
                        kth = lg.topk(top_k, dim=-1).values[:, -1:]
                        lg = lg.masked_fill(lg < kth, float("-inf"))
                    cdf = torch.softmax(lg.double(), -1).cumsum(-1)
                    tok = torch.searchsorted(cdf, (noise[:, t] * cdf[:, -1])[:, None]).squeeze(1)
                    tok = tok.clamp_(max=lg.shape[-1] - 1)
                if stop is not None:
                    tok = torch.where(done, torch.full_like(tok, stop - lo), tok)
                    done |= tok == (stop - lo)
                out[:, t] = tok
                if t == steps - 1 or (stop is not None and bool(done.all())):
                    break
                nxt = tok + lo
                if uncond:
                    nxt = torch.cat([nxt, nxt])
                p = (lens + t)[:, None]
                logits = self.net(nxt[:, None], p, cache, None, last_only=True, vocab_range=(lo, hi))[:, -1].float()
        return out

    def _image_noise(self, seeds: list[int]) -> torch.Tensor:
        n = self.codebook.tokens_per_image
        return torch.stack([uniforms(s, n) for s in seeds])

    def _image_bias(self) -> torch.Tensor:
        """Step 0 draws a background token, the other steps patch tokens."""
        n, B = self.codebook.tokens_per_image, self.codebook.n_backgrounds
        b = torch.zeros(n, self.codebook.k)
        b[0, B:] = float("-inf")
        b[1:, :B] = float("-inf")
        return b.to(self.device)

    def _draw(self, prefixes, uncond, seeds, cfg_scales, temperature, top_k) -> list[Image.Image]:
        v = self.vocab
        n = self.codebook.tokens_per_image
        bs = self.config.sampling.batch_size
        out: list[Image.Image] = []
        for s in range(0, len(prefixes), bs):
            e = min(len(prefixes), s + bs)
            sc = list(cfg_scales[s:e])
            use_cfg = any(x != 1.0 for x in sc)
            noise = self._image_noise(seeds[s:e]) if temperature > 0 else None
            codes = self._decode(prefixes[s:e], n, v.img_offset, v.img_offset + v.n_codes, noise, temperature,
                                 top_k, uncond[s:e] if use_cfg else None, sc if use_cfg else None,
                                 bias=self._image_bias())
            out += self.codebook.decode(codes.cpu().numpy())
        return out

    # ------------------------------------------------------------------ prompt language (for the stages)
    @staticmethod
    def canonical_prompt(text: str) -> tuple[str | None, str | None, str | None]:
        """(canonical text, category, None) for a valid world prompt, else (None, None, reason)."""
        from model.world import parse

        r = parse(text)
        return (r.spec.to_text(), r.spec.category, None) if r.ok else (None, None, r.reason)

    # ------------------------------------------------------------------ roles
    def generate(self, prompts: list[str], seeds: list[int], cfg_scales: list[float],
                 temperature: float = 1.0, top_k: int | None = None) -> list[Image.Image]:
        _check_lengths(prompts=prompts, seeds=seeds, cfg_scales=cfg_scales)
        v = self.vocab
        prefixes = [S.gen_prefix(v, self.text_ids(p)) for p in prompts]
        uncond = [S.gen_prefix(v, None) for _ in prompts]
        return self._draw(prefixes, uncond, seeds, cfg_scales, temperature, top_k)

    def reflect(self, prompts: list[str], images: list[Image.Image], seeds: list[int],
                cfg_scales: list[float], temperature: float = 1.0, top_k: int | None = None) -> list[Image.Image]:
        _check_lengths(prompts=prompts, images=images, seeds=seeds, cfg_scales=cfg_scales)
        v = self.vocab
        codes = self.image_codes(images)
        prefixes = [S.reflect_prefix(v, self.text_ids(p), c) for p, c in zip(prompts, codes)]
        uncond = [S.reflect_prefix(v, None, c) for c in codes]
        return self._draw(prefixes, uncond, seeds, cfg_scales, temperature, top_k)

    def _text_bias(self, allow_eos: bool = True) -> torch.Tensor:
        v = self.vocab
        b = torch.full((v.text_size,), float("-inf"))
        b[len(v.specials) + len(v.categories):] = 0.0
        b[v.UNK] = float("-inf")
        if allow_eos:
            b[v.EOS] = 0.0
        return b.to(self.device)

    def _text_decode(self, prefixes: list[list[int]], seeds: list[int] | None, temperature: float) -> list[str]:
        v = self.vocab
        if not prefixes:
            return []
        steps = self.config.sampling.max_text_tokens
        steps = min(steps, self.net.cfg.max_len - max(len(p) for p in prefixes))
        out: list[str] = []
        bs = self.config.sampling.batch_size
        for s in range(0, len(prefixes), bs):
            e = min(len(prefixes), s + bs)
            noise = None
            if seeds is not None and temperature > 0:
                noise = torch.stack([uniforms(x, steps) for x in seeds[s:e]])
            ids = self._decode(prefixes[s:e], steps, 0, v.text_size, noise, temperature, None,
                               bias=self._text_bias(), stop=v.EOS)
            out += [detokenize(v.words_of(r)) for r in ids.cpu().tolist()]
        return out

    def propose(self, categories: list[str], examples: list[list[str]], seeds: list[int],
                temperature: float = 0.8) -> list[str]:
        _check_lengths(categories=categories, examples=examples, seeds=seeds)
        v = self.vocab
        prefixes = []
        for c, ex in zip(categories, examples):
            if c not in v.categories:
                raise ValueError(f"unknown category {c!r}; the model knows {v.categories}")
            prefixes.append(S.propose_prefix(v, c, [self.text_ids(e) for e in ex[:3]]))
        return self._text_decode(prefixes, seeds, temperature)

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        _check_lengths(images=images, questions=questions)
        v = self.vocab
        codes = self.image_codes(images)
        prefixes = [S.und_prefix(v, c) + S.question_block(v, self.text_ids(q)) for c, q in zip(codes, questions)]
        return self._text_decode(prefixes, None, 0.0)

    def caption(self, images: list[Image.Image], template: int = 0) -> list[str]:
        return self.answer(images, [S.CAPTION_TEMPLATES[template]] * len(images))

    def yes_prob(self, codes: np.ndarray, questions: list[list[int]], owner: list[int]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) for each question about image `owner[i]` (image prefix cached once)."""
        v = self.vocab
        yes, no = v.stoi.get("yes"), v.stoi.get("no")
        if yes is None or no is None:
            raise RuntimeError("the vocabulary has no 'yes'/'no' words")
        dev = self.device
        res = torch.zeros(len(questions))
        if not questions:
            return res
        owner_t = torch.tensor(owner)
        jb = self.config.sampling.judge_batch
        n_img = codes.shape[0]
        with torch.inference_mode():
            for s in range(0, n_img, jb):
                e = min(n_img, s + jb)
                sel = ((owner_t >= s) & (owner_t < e)).nonzero().flatten()
                if len(sel) == 0:
                    continue
                pre = torch.tensor([S.und_prefix(v, c) for c in codes[s:e]], device=dev)
                blocks = [S.question_block(v, questions[i]) for i in sel.tolist()]
                Tq = max(len(b) for b in blocks)
                cache = self.net.new_cache(e - s)
                cache.k = [k[:, :, :pre.shape[1] + Tq] for k in cache.k]
                cache.v = [x[:, :, :pre.shape[1] + Tq] for x in cache.v]
                self.net(pre, None, cache, last_only=True)
                for qs in range(0, len(sel), 1024):
                    part = sel[qs:qs + 1024]
                    blk = blocks[qs:qs + 1024]
                    qids = torch.full((len(part), Tq), v.PAD, dtype=torch.long)
                    last = torch.tensor([len(b) - 1 for b in blk])
                    for i, b in enumerate(blk):
                        qids[i, :len(b)] = torch.tensor(b)
                    sub = cache.index_select((owner_t[part] - s).to(dev))
                    logits = self.net(qids.to(dev), None, sub)
                    lg = logits[torch.arange(len(part)), last.to(dev)].float()
                    res[part] = torch.sigmoid(lg[:, yes] - lg[:, no]).cpu()
        return res

    def judge_facts(self, prompts: list[str], images: list[Image.Image]):
        """Per (prompt, image): (spec, facts, fact_ok) from the model's own yes/no answers, or None."""
        from model.world import facts as world_facts, parse
        codes = self.image_codes(images)
        specs, fl = [], []
        qs, owner = [], []
        for i, p in enumerate(prompts):
            r = parse(p)
            if not r.ok:
                specs.append(None)
                fl.append([])
                continue
            fs = list(world_facts(r.spec))
            specs.append(r.spec)
            fl.append(fs)
            for f in fs:
                qs.append(self.text_ids(f.question))
                owner.append(i)
        py = self.yes_prob(codes, qs, owner)
        out, j = [], 0
        for spec, fs in zip(specs, fl):
            if spec is None:
                out.append(None)
                continue
            ok = []
            for f in fs:
                said = "yes" if py[j] >= 0.5 else "no"
                ok.append(said == f.expected)
                j += 1
            out.append((spec, fs, ok))
        return out

    def judge(self, prompts: list[str], images: list[Image.Image], rubric: Any = None) -> list[Judgement]:
        from model.world import Rubric, reasoning_text, score as world_score
        _check_lengths(prompts=prompts, images=images)
        # a stage passes its config's rubric as a dict of overrides
        rubric = Rubric.model_validate(rubric) if isinstance(rubric, dict) else (rubric or Rubric())
        out = []
        for p, r in zip(prompts, self.judge_facts(prompts, images)):
            if r is None:
                msg = f"the prompt could not be parsed: {p!r}"
                out.append(Judgement(reasoning=msg, score=None, raw=msg, parse_ok=False))
                continue
            spec, fs, ok = r
            sc = int(world_score(spec, ok, rubric))
            text = reasoning_text(spec, fs, ok, sc)
            out.append(Judgement(reasoning=text, score=sc, raw=text, parse_ok=True))
        return out

    # ------------------------------------------------------------------ training
    def train(self, mode: bool = True) -> "EmbeddedUMM":
        self.net.train(mode)
        return self

    def parameters(self):
        return self.net.parameters()

    def kind_losses(self, ids: torch.Tensor, targets: torch.Tensor, kinds: torch.Tensor | None = None
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One forward pass over collated sequences: each loss kind's mean cross-entropy over its target tokens
        (with grad, in sequences.KINDS order, the kinds present only), and the per-token cross-entropy."""
        dev = self.device
        ids, targets = ids.to(dev), targets.to(dev)
        logits = self.net(ids[:, :-1])
        tg = targets[:, 1:]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                             reduction="none").view(tg.shape)
        if kinds is None:
            kinds = torch.zeros(ids.shape[0], dtype=torch.long)
        kinds = kinds.to(dev)
        parts: dict[str, torch.Tensor] = {}
        for name, kid in S.KIND_IDS.items():
            rows = kinds == kid
            m = tg & rows[:, None]
            n = m.sum()
            if int(n) == 0:
                continue
            parts[name] = (ce * m).sum() / n
        return parts, ce

    def token_loss(self, ids: torch.Tensor, targets: torch.Tensor, kinds: torch.Tensor | None = None,
                   weights: dict[str, float] | None = None, reduce: bool = True):
        """Pretraining's loss: per-kind mean cross-entropy over target tokens, combined with per-kind weights
        (keyed by loss kind, default the config's).

        Returns the weighted loss (with grad) and a dict of per-kind losses (detached tensors) for logging.
        """
        parts, ce = self.kind_losses(ids, targets, kinds)
        weights = weights if weights is not None else self.config.loss_weights
        total = ce.sum() * 0.0
        wsum = 0.0
        for name, lk in parts.items():
            w = float(weights.get(name, 1.0))
            total = total + w * lk
            wsum += w
        if wsum > 0:
            total = total / wsum
        return total, {k: v.detach() for k, v in parts.items()}

    def example_seqs(self, ex: CPRExample) -> tuple[str, list[tuple[list[int], list[bool]]]]:
        """The training sequences of one CPR example: (loss kind, sequences)."""
        v = self.vocab
        k = ex.kind
        if k == "generation":
            codes = self.image_codes([ex.target_image])[0]
            return "generation", [S.generation_seq(v, self.text_ids(ex.input_text), codes)]
        if k == "caption":
            codes = self.image_codes([ex.input_image])[0]
            q = self.text_ids(ex.input_text) if ex.input_text else self.text_ids(S.CAPTION_TEMPLATES[0])
            return "caption", [S.question_seq(v, codes, [(q, self.text_ids(ex.target_text or ""))])]
        if k == "reflection":
            codes = self.image_codes([ex.input_image, ex.target_image])
            return "reflection", [S.reflection_seq(v, self.text_ids(ex.input_text), codes[0], codes[1])]
        if k == "judgement":
            return "question", self._judgement_seqs(ex)
        if k == "question":
            codes = self.image_codes([ex.input_image])[0]
            return "question", [S.question_seq(v, codes, [(self.text_ids(ex.input_text),
                                                           self.text_ids(ex.target_text or ""))])]
        raise ValueError(f"unknown CPR kind {k!r} (expected one of generation, caption, judgement, reflection)")

    def _judgement_seqs(self, ex: CPRExample):
        """Judgement = the judge's per-fact yes/no answers on the image, recovered from its reasoning.

        The prompt is `meta['prompt']` if given, else `input_text`. The target reasoning is parsed with
        the world's `parse_reasoning`; each checked fact becomes a question whose answer is what the
        judge concluded (the fact's expected answer when it held, the opposite when it failed). The score
        is not a target: this judge computes it from the verdicts with the rubric, and training the model
        to say it (tried) cost generation accuracy and judge agreement.
        """
        from model.world import facts as world_facts, parse, parse_reasoning
        v = self.vocab
        meta = ex.meta
        if isinstance(meta, str):
            try:
                meta = json.loads(meta) if meta else {}
            except ValueError:
                meta = {}
        prompt = (meta or {}).get("prompt") or ex.input_text
        r = parse(prompt)
        got = parse_reasoning(ex.target_text or "")
        if not r.ok or got is None:
            return []
        fact_ok, _ = got
        fs = list(world_facts(r.spec))
        if len(fs) != len(fact_ok):
            return []
        codes = self.image_codes([ex.input_image])[0]
        qa = []
        for f, ok in zip(fs, fact_ok):
            ans = f.expected if ok else ("no" if f.expected == "yes" else "yes")
            qa.append((self.text_ids(f.question), self.text_ids(ans)))
        # one fact per sequence, as the judge asks them (`yes_prob`): four facts in one sequence trained the
        # answers in a context the judge never sees, and held-out judgement loss rose (0.0127 -> 0.0130); asked
        # alone it falls (0.0192 -> 0.0146) on the same small mixture
        return [S.question_seq(v, codes, [x]) for x in qa]

    @property
    def default_loss_weights(self) -> dict[str, float]:
        """The config's per-kind weights, keyed by CPR kind (question -> judgement)."""
        return {CPR_KIND_OF.get(k, k): w for k, w in self.config.loss_weights.items()}

    def loss_terms(self, examples: list[CPRExample]) -> dict[str, LossTerm]:
        """Per CPR kind (in sequences.KINDS order): its token-mean loss and example count. All sequences of the
        batch run in one forward pass; each kind's loss comes out of its rows' target mask."""
        seqs, kinds, count = [], [], defaultdict(int)
        for ex in examples:
            kind, ss = self.example_seqs(ex)
            seqs += ss
            kinds += [S.KIND_IDS[kind]] * len(ss)
            count[kind] += 1 if ss else 0
        if not seqs:
            return {}
        ids, tg = S.collate(seqs, self.vocab.PAD, self.net.cfg.max_len)
        parts, _ = self.kind_losses(ids, tg, torch.tensor(kinds))
        return {CPR_KIND_OF.get(k, k): LossTerm(lk, count[k]) for k, lk in parts.items()}

    def tokens_per_example(self, example: CPRExample) -> int:
        """Tokens of the example's training sequences; a preference pair runs two generation sequences."""
        if example.kind in ("preference", "group"):  # generation sequences of its image(s)
            gen = [CPRExample("generation", example.input_text, target_image=im)
                   for im in (example.target_image, example.rejected_image) if im is not None]
            return sum(self.tokens_per_example(g) for g in gen)
        return sum(len(ids) for ids, _ in self.example_seqs(example)[1])

    def _generation_logits(self, prompt_ids: list[list[int] | None], codes) -> tuple[torch.Tensor, ...]:
        """One forward over generation sequences (a prompt, or None for the unconditional row, then the image's
        codes): the logits predicting each next token (R, L-1, vocab), the next ids (R, L-1) and the mask of image
        tokens among them (every row has exactly one image's tokens)."""
        ids, tg = S.collate([S.generation_seq(self.vocab, p, c) for p, c in zip(prompt_ids, codes)], self.vocab.PAD)
        ids, tg = ids.to(self.device), tg.to(self.device)
        return self.net(ids[:, :-1]).float(), ids[:, 1:], tg[:, 1:]

    def token_logprobs(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """Log-probability of each image token given its prompt and the tokens before it (B, tokens per image),
        with grad."""
        logits, nxt, tg = self._generation_logits([self.text_ids(p) for p in prompts], self.image_codes(images))
        lp = torch.log_softmax(logits, -1).gather(-1, nxt[..., None]).squeeze(-1)
        return lp[tg].view(len(prompts), -1)

    def sequence_logprob(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """Sum of log-probabilities of each image's tokens given its prompt (B,), with grad: for DPO."""
        return self.token_logprobs(prompts, images).sum(-1)

    def image_token_logprobs(self, examples: list[CPRExample]) -> torch.Tensor:
        """Under the sampler's own policy (`sampling_policy`): image codes only with the decode's bias, guided
        by each image's CFG scale (an unconditional pass for those not at 1) and divided by its temperature."""
        v, n = self.vocab, self.codebook.tokens_per_image
        codes = self.image_codes([e.target_image for e in examples])
        temps, scales = zip(*(sampling_policy(e) for e in examples))

        def image_logits(prompts: list[list[int] | None], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            logits, nxt, tg = self._generation_logits(prompts, codes[rows])
            logits = logits[..., v.img_offset:v.img_offset + v.n_codes]
            return logits[tg].view(len(rows), n, -1), nxt[tg].view(len(rows), n) - v.img_offset

        everyone = list(range(len(examples)))
        cond, target = image_logits([self.text_ids(e.input_text) for e in examples], everyone)
        guided = [i for i in everyone if scales[i] != 1.0]
        uncond = image_logits([None] * len(guided), guided)[0] if guided else None
        logits = guide(cond, uncond, list(scales), guided) + self._image_bias()
        lp = torch.log_softmax(logits / torch.tensor(temps, device=logits.device)[:, None, None], -1)
        return lp.gather(-1, target[..., None]).squeeze(-1)

    def preference_logprobs(self, examples: list[CPRExample]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(chosen, rejected, tokens per image): summed log-probabilities of target_image and of rejected_image
        given input_text (B,), with grad."""
        prompts = [e.input_text for e in examples]
        chosen = self.sequence_logprob(prompts, [e.target_image for e in examples])
        rejected = self.sequence_logprob(prompts, [e.rejected_image for e in examples])
        return chosen, rejected, self.codebook.tokens_per_image


def _check_lengths(**lists) -> None:
    lens = {k: len(v) for k, v in lists.items()}
    if len(set(lens.values())) > 1:
        raise ValueError(f"batched arguments differ in length: {lens}")
