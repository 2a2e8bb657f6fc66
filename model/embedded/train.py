"""Pretraining of the embedded model from scratch on the world's ground truth; plain Python, no Prefect.

    python -m model.embedded.train configs/pretrain/base.yaml [key=value ...] [--out DIR]

Fits the patch codebook, builds a corpus (refreshed in the background by worker processes where
there are spare cores), trains with AdamW + warm-up + cosine decay (bf16 autocast), evaluates
snapshots against the oracle, keeps the chosen one, and writes the checkpoint directory: weights
(safetensors), config.json, recipe.yaml, metrics.json, curve.json and curve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import yaml

from configs.loader import FloatPair, Strict, load_config
from model.embedded import sequences as S
from model.embedded.data import CorpusBuilder, DataMix, build_corpus, fit_codebook
from model.embedded.umm import EmbeddedModelConfig, EmbeddedUMM
from model.schedule import warmup_cosine


class TokenizerConfig(Strict):
    fit_images: int = 20000


class OptimConfig(Strict):
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16: bool = True  # autocast; ignored where unsupported


class CorpusConfig(Strict):
    size: int = 50_000  # sequences held in memory
    workers: int = 0  # 0: all cores but one (at least 1); 1: build in-process, no refresh
    refresh: bool = True  # keep replacing old sequences with new ones from the workers while training
    chunk: int = 1000
    mix: DataMix = DataMix()


class SelectConfig(Strict):
    """Snapshots every `every` steps (from `start`) are evaluated; `mode` picks the one shipped."""

    every: int = 0  # 0: no snapshot evaluation; ship the last weights
    start: int = 0
    n_prompts: int = 200
    mode: Literal["last", "best_judge_in_band"] = "last"
    gen_band: FloatPair = (0.35, 0.75)
    min_und: float = 0.95
    min_non_unification: float = 0.20


class SelfDataConfig(Strict):
    """Question sequences on the model's own images, answered by the oracle (pretraining ground truth).

    Every `every` steps from `start`, the current model draws `images` images of random prompts (CFG scale
    uniform in cfg_range, the rollout's range); the oracle answers the prompt's fact questions on them.
    Batches then take `share` of their rows from this buffer: the judge learns what its own failures
    look like (fragments, wrong glyphs, stray blobs), which clean perturbed scenes do not show it.
    """

    every: int = 0  # 0: off
    start: int = 1000
    images: int = 512
    share: float = 0.2
    buffer: int = 40000
    min_fill: int = 2000
    cfg_range: FloatPair = (3.0, 8.0)
    temperature: float = 1.0
    # None: `temperature` for all; else each of `temperature_groups` groups of the images draws its own
    # temperature uniformly from this range (the rollout sweeps temperature too)
    temperature_range: FloatPair | None = None
    temperature_groups: int = 4
    workers: int = 2  # processes that label the images with the oracle


class PretrainConfig(Strict):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    model: EmbeddedModelConfig = EmbeddedModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    corpus: CorpusConfig = CorpusConfig()
    optim: OptimConfig = OptimConfig()
    select: SelectConfig = SelectConfig()
    self_data: SelfDataConfig = SelfDataConfig()
    eval_prompts: int = 500  # final evaluation (0: skip)
    log_every: int = 25
    time_limit_s: float | None = None  # stop when spent (from the start); the lr schedule decays within it


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda asked for, but torch sees no GPU")
    return torch.device(name)


def lr_at(step: int, o: OptimConfig, time_frac: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to min_lr over the run's progress: the larger of the step
    fraction and `time_frac` (the share of the time budget spent), so a time-limited run still decays."""
    return warmup_cosine(step, o.lr, o.min_lr, o.warmup, o.steps, time_frac)


class _Refresher:
    """Background corpus refresh: worker processes keep making chunks; the trainer swaps them in."""

    def __init__(self, builder: CorpusBuilder, workers: int, chunk: int, seed: int):
        import multiprocessing as mp
        from model.embedded import data as D
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.stop = threading.Event()
        self.slots = threading.Semaphore(2 * workers + 4)  # bounds the chunks in flight
        ctx = mp.get_context("fork")
        self.pool = ctx.Pool(workers, initializer=D._init_worker, initargs=(builder,))

        def jobs():
            i = 0
            while not self.stop.is_set():
                while not self.slots.acquire(timeout=0.5):
                    if self.stop.is_set():
                        return
                yield (chunk, seed * 7_000_003 + 1_000_000 + i)
                i += 1

        def run():
            try:
                for part in self.pool.imap_unordered(D._build_chunk, jobs()):
                    if self.stop.is_set():
                        break
                    self.q.put(part)
            except Exception:  # pool closed on shutdown
                pass

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def get(self):
        try:
            part = self.q.get_nowait()
        except queue.Empty:
            return None
        self.slots.release()
        return part

    def close(self):
        self.stop.set()
        self.pool.terminate()


def _self_label(args):
    """Worker: oracle-labelled question sequences for (prompt, image array) pairs."""
    from PIL import Image
    from model.embedded import data as D
    prompts, arrs, codes, seed, n_qa = args
    rng = random.Random(seed)
    out = []
    for p, a, c in zip(prompts, arrs, codes):
        out.append(D._WORKER.fact_qa(p, Image.fromarray(a, "RGB"), rng, n_qa, codes=c))
    return out


def _plot_curve(curve: list[dict], evals: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [c["step"] for c in curve]
    axes[0].plot(steps, [c["loss"] for c in curve], label="weighted loss", color="k")
    kinds = sorted({k for c in curve for k in c.get("kinds", {})})
    for k in kinds:
        xs = [c["step"] for c in curve if k in c.get("kinds", {})]
        axes[0].plot(xs, [c["kinds"][k] for c in curve if k in c.get("kinds", {})], label=k, alpha=0.7)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss")
    axes[0].legend(fontsize=7)
    if evals:
        xs = [e["step"] for e in evals]
        for key in ("und_acc_gt", "gen_acc_oracle", "non_unification", "judge_oracle_agreement"):
            axes[1].plot(xs, [e[key] for e in evals], marker="o", label=key)
        axes[1].set_ylim(0, 1)
        axes[1].set_xlabel("step")
        axes[1].set_title("snapshot evaluation (oracle)")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _choose(evals: list[dict], s: SelectConfig) -> dict | None:
    if not evals:
        return None
    if s.mode == "last":
        return evals[-1]
    lo, hi = s.gen_band
    ok = [e for e in evals if lo <= e["gen_acc_oracle"] <= hi and e["und_acc_gt"] >= s.min_und
          and e["non_unification"] >= s.min_non_unification]
    pool = ok or evals
    return max(pool, key=lambda e: (e["judge_oracle_agreement"], e["und_acc_gt"]))


class _Corpus:
    """The corpus as tensors; with a refresher, chunks from the background workers overwrite it as a ring."""

    def __init__(self, corpus: dict[str, np.ndarray], builder: CorpusBuilder, cc: CorpusConfig, workers: int,
                 seed: int):
        self.ids = torch.from_numpy(corpus["ids"].astype(np.int64))
        self.targets = torch.from_numpy(corpus["targets"])
        self.kinds = torch.from_numpy(corpus["kinds"].astype(np.int64))
        self.lens = torch.from_numpy(corpus["lens"].astype(np.int64))
        self.refresher = _Refresher(builder, workers, cc.chunk, seed) if (cc.refresh and workers > 1) else None
        self.ring = 0
        self.refreshed = 0

    def refresh(self) -> None:
        """Swap in up to two chunks the workers have finished."""
        if self.refresher is None:
            return
        for _ in range(2):
            part = self.refresher.get()
            if part is None:
                break
            n = len(part["kinds"])
            idx = (torch.arange(n) + self.ring) % self.ids.shape[0]
            self.ids[idx] = torch.from_numpy(part["ids"].astype(np.int64))
            self.targets[idx] = torch.from_numpy(part["targets"])
            self.kinds[idx] = torch.from_numpy(part["kinds"].astype(np.int64))
            self.lens[idx] = torch.from_numpy(part["lens"].astype(np.int64))
            self.ring = (self.ring + n) % self.ids.shape[0]
            self.refreshed += n

    def close(self) -> None:
        if self.refresher is not None:
            self.refresher.close()


class _SelfData:
    """The buffer of oracle-labelled question sequences on the model's own images (see SelfDataConfig)."""

    def __init__(self, sd: SelfDataConfig, builder: CorpusBuilder, pad: int, max_len: int, seed: int,
                 qa_per_seq: int):
        self.sd, self.builder, self.pad, self.qa_per_seq = sd, builder, pad, qa_per_seq
        rows = sd.buffer if sd.every else 1
        self.ids = torch.full((rows, max_len), pad, dtype=torch.long)
        self.targets = torch.zeros((rows, max_len), dtype=torch.bool)
        self.lens = torch.zeros(rows, dtype=torch.long)
        self.n, self.time = 0, 0.0
        self.rng = random.Random(seed + 99)
        self.jobs: list = []
        self.pool = None
        if sd.every:
            import multiprocessing as mp
            from model.embedded import data as D
            self.pool = mp.get_context("fork").Pool(sd.workers, initializer=D._init_worker, initargs=(builder,))

    def due(self, step: int) -> bool:
        sd = self.sd
        return bool(sd.every) and step >= sd.start and (step - sd.start) % sd.every == 0

    def generate(self, model: EmbeddedUMM, codebook) -> None:
        """Draw images of random prompts with the current model; queue their labelling by the oracle."""
        sd, rng = self.sd, self.rng
        t_sd = time.perf_counter()
        model.train(False)
        sp = [self.builder._prompt_text(self.builder._prompt(rng)[1]) for _ in range(sd.images)]
        scales = [rng.uniform(*sd.cfg_range) for _ in sp]
        seeds = [rng.randrange(2**31) for _ in sp]
        if sd.temperature_range is None:
            imgs = model.generate(sp, seeds, scales, temperature=sd.temperature)
        else:
            imgs, g = [], max(1, len(sp) // sd.temperature_groups)
            for i in range(0, len(sp), g):
                imgs += model.generate(sp[i:i + g], seeds[i:i + g], scales[i:i + g],
                                       temperature=rng.uniform(*sd.temperature_range))
        model.train()
        codes = codebook.encode(imgs)
        arrs = [np.asarray(im) for im in imgs]
        k = max(1, len(sp) // sd.workers)
        for i in range(0, len(sp), k):
            self.jobs.append(self.pool.apply_async(_self_label, ((sp[i:i + k], arrs[i:i + k], codes[i:i + k],
                                                                  rng.randrange(2**31), self.qa_per_seq),)))
        self.time += time.perf_counter() - t_sd

    def collect(self) -> None:
        """Move finished labelling jobs into the buffer (waiting on the oldest when too many are pending)."""
        sd = self.sd
        while self.jobs and (self.jobs[0].ready() or len(self.jobs) > 4 * sd.workers):
            for s_ids, s_tg in self.jobs.pop(0).get():
                j = self.n % sd.buffer
                self.ids[j] = self.pad
                self.ids[j, :len(s_ids)] = torch.tensor(s_ids)
                self.targets[j] = False
                self.targets[j, :len(s_tg)] = torch.tensor(s_tg)
                self.lens[j] = len(s_ids)
                self.n += 1

    def rows_in(self, batch_size: int) -> int:
        """How many rows of a batch come from this buffer (0 until it holds `min_fill`)."""
        sd = self.sd
        return int(sd.share * batch_size) if (sd.every and self.n >= sd.min_fill) else 0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


class _Pretraining:
    """One pretraining run, torchtune-style: `setup` (seeds, codebook and model, corpus, optimizer, self-data),
    `train` (the step loop with snapshot evaluation), `save` (the chosen weights, final evaluation, files)."""

    def __init__(self, cfg: PretrainConfig, out_dir: str | Path, progress: bool, log: Callable[[str], None]):
        self.cfg, self.out, self.progress, self.log = cfg, Path(out_dir), progress, log
        self.curve: list[dict] = []
        self.evals: list[dict] = []
        self.snaps: dict[int, dict] = {}
        self.step = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from model.world import CATEGORIES, WORDS

        cfg = self.cfg
        self.t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dev = resolve_device(cfg.device)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        t0 = time.perf_counter()
        self.codebook = fit_codebook(cfg.model.n_masks, cfg.tokenizer.fit_images, cfg.seed,
                                     cfg.model.image_size)
        self.model = model = EmbeddedUMM.create(cfg.model, self.codebook, list(WORDS), list(CATEGORIES))
        model.net.to(self.dev)
        self.log(f"[pretrain] device={self.dev} params={model.num_params():,} vocab={model.vocab.size} "
                 f"codebook fit {time.perf_counter() - t0:.1f}s")
        self._setup_corpus()
        self._setup_optimizer()
        self.self_data = _SelfData(cfg.self_data, self.builder, model.vocab.PAD, model.net.cfg.max_len, cfg.seed,
                                   cfg.corpus.mix.qa_per_seq)

    def _setup_corpus(self) -> None:
        from tqdm import tqdm

        cfg, model = self.cfg, self.model
        self.builder = CorpusBuilder(model.vocab, self.codebook, cfg.corpus.mix, model.net.cfg.max_len)
        workers = cfg.corpus.workers or max(1, (os.cpu_count() or 2) - 1)
        t0 = time.perf_counter()
        bar = tqdm(total=cfg.corpus.size, desc="corpus", unit="seq", disable=not self.progress, mininterval=1.0)
        corpus = build_corpus(self.builder, cfg.corpus.size, cfg.seed, workers=workers, chunk=cfg.corpus.chunk,
                              progress=bar.update)
        bar.close()
        self.log(f"[pretrain] corpus {cfg.corpus.size} sequences in {time.perf_counter() - t0:.1f}s "
                 f"({workers} workers); kinds {np.bincount(corpus['kinds'], minlength=5).tolist()}")
        self.corpus = _Corpus(corpus, self.builder, cfg.corpus, workers, cfg.seed)

    def _setup_optimizer(self) -> None:
        o, dev = self.cfg.optim, self.dev
        decay, no_decay = [], []
        for n, p in self.model.net.named_parameters():
            (decay if p.dim() >= 2 and "pos" not in n and "tok" not in n else no_decay).append(p)
        fused = dev.type == "cuda"
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=o.lr, betas=(o.beta1, o.beta2), fused=fused)
        self.use_bf16 = o.bf16 and (dev.type == "cpu" or torch.cuda.is_bf16_supported())
        self.gen = torch.Generator().manual_seed(self.cfg.seed)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        """Steps until `optim.steps` or the time limit; then stops the background workers."""
        from tqdm import tqdm

        cfg, o = self.cfg, self.cfg.optim
        self.acc: dict[str, list[float]] = {}
        self.acc_loss: list[float] = []
        self.model.train()
        self.bar = tqdm(total=o.steps, desc="pretrain", unit="step", disable=not self.progress, mininterval=1.0)
        self.t_train = time.perf_counter()
        step = 0
        for step in range(o.steps):
            self.corpus.refresh()
            lr = self._set_lr(step)
            if self.self_data.due(step):
                self.self_data.generate(self.model, self.codebook)
            self.self_data.collect()
            loss, parts = self.train_step(*self._batch())
            self._record(step, lr, loss, parts)
            s = cfg.select
            timed_out = cfg.time_limit_s is not None and time.perf_counter() - self.t_start > cfg.time_limit_s
            if s.every and (step + 1) >= s.start and ((step + 1) % s.every == 0 or timed_out):
                self.evaluate_snapshot(step + 1)
            if timed_out:
                self.log(f"[pretrain] time limit {cfg.time_limit_s}s reached at step {step + 1}")
                break
        self.step = step
        self.bar.close()
        self.train_s = time.perf_counter() - self.t_train
        self.corpus.close()
        self.self_data.close()

    def _set_lr(self, step: int) -> float:
        cfg = self.cfg
        time_frac = 0.0
        if cfg.time_limit_s:
            time_frac = (time.perf_counter() - self.t_train) / max(1.0, cfg.time_limit_s
                                                                   - (self.t_train - self.t_start))
        lr = lr_at(step, cfg.optim, time_frac)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, targets, kinds) of one batch: corpus rows, the last of them replaced by self-data rows."""
        c, sdb, bsz = self.corpus, self.self_data, self.cfg.optim.batch_size
        b = torch.randint(0, c.ids.shape[0], (bsz,), generator=self.gen)
        n_self = sdb.rows_in(bsz)
        if n_self:
            bs = torch.randint(0, min(sdb.n, sdb.sd.buffer), (n_self,), generator=self.gen)
            b = b[n_self:]
            T = int(max(c.lens[b].max(), sdb.lens[bs].max()))
            ids = torch.cat([c.ids[b, :T], sdb.ids[bs, :T]])
            tg = torch.cat([c.targets[b, :T], sdb.targets[bs, :T]])
            kd = torch.cat([c.kinds[b], torch.full((n_self,), S.KIND_IDS["question"], dtype=torch.long)])
        else:
            T = int(c.lens[b].max())
            ids, tg, kd = c.ids[b, :T], c.targets[b, :T], c.kinds[b]
        return ids, tg, kd

    def train_step(self, ids: torch.Tensor, tg: torch.Tensor, kd: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One optimizer step on a batch; returns the loss and its parts by kind."""
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            loss, parts = self.model.token_loss(ids, tg, kd)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.net.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        return loss, parts

    def _record(self, step: int, lr: float, loss: torch.Tensor, parts: dict) -> None:
        """Accumulate the step's losses; every `log_every` steps (and the last) append their means to the curve."""
        self.acc_loss.append(loss.detach())
        for k, x in parts.items():
            self.acc.setdefault(k, []).append(x)
        self.bar.update(1)
        if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.optim.steps:
            rec = {"step": step + 1, "loss": float(torch.stack(self.acc_loss).float().mean()), "lr": lr,
                   "kinds": {k: float(torch.stack(x).float().mean()) for k, x in self.acc.items()},
                   "elapsed_s": round(time.perf_counter() - self.t_train, 1)}
            self.curve.append(rec)
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", q=f"{rec['kinds'].get('question', float('nan')):.3f}")
            self.acc_loss, self.acc = [], {}

    def evaluate_snapshot(self, step: int) -> None:
        """Evaluate the current weights against the oracle and keep them as the snapshot of `step`."""
        from model.embedded.evaluate import evaluate

        model, s = self.model, self.cfg.select
        model.train(False)
        model.weights_changed()
        ev = evaluate(model, n_prompts=s.n_prompts, seed=777)
        ev = {"step": step, **{k: ev[k] for k in ("und_acc_gt", "gen_acc_oracle", "non_unification",
                                                  "judge_oracle_agreement")}}
        self.evals.append(ev)
        self.snaps[step] = {k: v.detach().clone().cpu() for k, v in model.net.state_dict().items()}
        self.log(f"[pretrain] step {step} eval {json.dumps(ev)}")
        if s.mode != "last" and _choose(self.evals, s) is ev:
            model.save_pretrained(self.out)  # the best so far survives a crash or a kill
        model.train()

    # ------------------------------------------------------------------ save
    def save(self) -> dict:
        """Load the chosen snapshot, run the final evaluation, write the checkpoint directory; the metrics."""
        from model.embedded.evaluate import evaluate

        cfg, model, out, step = self.cfg, self.model, self.out, self.step
        model.train(False)
        chosen = _choose(self.evals, cfg.select)
        if chosen is not None and cfg.select.mode != "last":
            model.net.load_state_dict({k: v.to(self.dev) for k, v in self.snaps[chosen["step"]].items()})
        model.weights_changed()
        model.net.to("cpu")

        final = {}
        if cfg.eval_prompts:
            final = evaluate(model, n_prompts=cfg.eval_prompts)
        model.save_pretrained(out)
        (out / "recipe.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        info = {"steps_run": step + 1, "chosen_step": chosen["step"] if chosen else step + 1,
                "train_s": round(self.train_s, 1), "total_s": round(time.perf_counter() - self.t_start, 1),
                "device": str(self.dev), "params": model.num_params(), "corpus_refreshed": self.corpus.refreshed,
                "self_images": self.self_data.n, "self_data_s": round(self.self_data.time, 1),
                "torch": torch.__version__}
        metrics = {**final, "training": info, "snapshots": self.evals}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        (out / "curve.json").write_text(json.dumps({"curve": self.curve, "snapshots": self.evals}) + "\n")
        try:
            _plot_curve(self.curve, self.evals, out / "curve.png")
        except Exception as exc:  # matplotlib missing: the JSON curve stays
            self.log(f"[pretrain] no curve.png: {exc}")
        self.log(f"[pretrain] wrote {out} (model_id {model.model_id}) in {info['total_s']}s")
        return metrics


def pretrain(cfg: PretrainConfig, out_dir: str | Path, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Train from scratch; write the checkpoint to out_dir; return the final metrics."""
    run = _Pretraining(cfg, out_dir, progress, log)
    run.setup()
    run.train()
    return run.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=None)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", default="runs/pretrain")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, PretrainConfig, a.overrides)
    metrics = pretrain(cfg, a.out, progress=not a.no_progress)
    print(json.dumps({k: v for k, v in metrics.items() if k != "snapshots"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
