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

from configs.loader import Strict, load_config
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
    gen_band: tuple[float, float] = (0.35, 0.75)
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
    cfg_range: tuple[float, float] = (3.0, 8.0)
    temperature: float = 1.0
    # None: `temperature` for all; else each of `temperature_groups` groups of the images draws its own
    # temperature uniformly from this range (the rollout sweeps temperature too)
    temperature_range: tuple[float, float] | None = None
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


def pretrain(cfg: PretrainConfig, out_dir: str | Path, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Train from scratch; write the checkpoint to out_dir; return the final metrics."""
    from tqdm import tqdm

    from model.world import CATEGORIES, WORDS
    from model.embedded.evaluate import evaluate

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = resolve_device(cfg.device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    t0 = time.perf_counter()
    codebook = fit_codebook(cfg.model.n_masks, cfg.tokenizer.fit_images, cfg.seed,
                            cfg.model.image_size)
    model = EmbeddedUMM.create(cfg.model, codebook, list(WORDS), list(CATEGORIES))
    model.net.to(dev)
    log(f"[pretrain] device={dev} params={model.num_params():,} vocab={model.vocab.size} "
        f"codebook fit {time.perf_counter() - t0:.1f}s")

    builder = CorpusBuilder(model.vocab, codebook, cfg.corpus.mix, model.net.cfg.max_len)
    workers = cfg.corpus.workers or max(1, (os.cpu_count() or 2) - 1)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.corpus.size, desc="corpus", unit="seq", disable=not progress, mininterval=1.0)
    corpus = build_corpus(builder, cfg.corpus.size, cfg.seed, workers=workers, chunk=cfg.corpus.chunk,
                          progress=bar.update)
    bar.close()
    log(f"[pretrain] corpus {cfg.corpus.size} sequences in {time.perf_counter() - t0:.1f}s "
        f"({workers} workers); kinds {np.bincount(corpus['kinds'], minlength=5).tolist()}")
    ids_all = torch.from_numpy(corpus["ids"].astype(np.int64))
    tg_all = torch.from_numpy(corpus["targets"])
    kinds_all = torch.from_numpy(corpus["kinds"].astype(np.int64))
    lens_all = torch.from_numpy(corpus["lens"].astype(np.int64))
    refresher = _Refresher(builder, workers, cfg.corpus.chunk, cfg.seed) \
        if (cfg.corpus.refresh and workers > 1) else None
    ring = 0

    o = cfg.optim
    decay, no_decay = [], []
    for n, p in model.net.named_parameters():
        (decay if p.dim() >= 2 and "pos" not in n and "tok" not in n else no_decay).append(p)
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), fused=fused)
    use_bf16 = o.bf16 and (dev.type == "cpu" or torch.cuda.is_bf16_supported())
    gen = torch.Generator().manual_seed(cfg.seed)
    curve: list[dict] = []
    evals: list[dict] = []
    snaps: dict[int, dict] = {}
    acc: dict[str, list[float]] = {}
    acc_loss: list[float] = []
    refreshed = 0
    sd = cfg.self_data
    L = model.net.cfg.max_len
    self_ids = torch.full((sd.buffer if sd.every else 1, L), model.vocab.PAD, dtype=torch.long)
    self_tg = torch.zeros((sd.buffer if sd.every else 1, L), dtype=torch.bool)
    self_lens = torch.zeros(sd.buffer if sd.every else 1, dtype=torch.long)
    self_n, self_time = 0, 0.0
    sd_rng = random.Random(cfg.seed + 99)
    jobs: list = []
    self_pool = None
    if sd.every:
        import multiprocessing as mp
        from model.embedded import data as D
        self_pool = mp.get_context("fork").Pool(sd.workers, initializer=D._init_worker, initargs=(builder,))
    model.train()
    bar = tqdm(total=o.steps, desc="pretrain", unit="step", disable=not progress, mininterval=1.0)
    t_train = time.perf_counter()
    step = 0
    for step in range(o.steps):
        if refresher is not None:
            for _ in range(2):
                part = refresher.get()
                if part is None:
                    break
                n = len(part["kinds"])
                idx = (torch.arange(n) + ring) % ids_all.shape[0]
                ids_all[idx] = torch.from_numpy(part["ids"].astype(np.int64))
                tg_all[idx] = torch.from_numpy(part["targets"])
                kinds_all[idx] = torch.from_numpy(part["kinds"].astype(np.int64))
                lens_all[idx] = torch.from_numpy(part["lens"].astype(np.int64))
                ring = (ring + n) % ids_all.shape[0]
                refreshed += n
        time_frac = 0.0
        if cfg.time_limit_s:
            time_frac = (time.perf_counter() - t_train) / max(1.0, cfg.time_limit_s - (t_train - t_start))
        lr = lr_at(step, o, time_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        sd = cfg.self_data
        if sd.every and step >= sd.start and (step - sd.start) % sd.every == 0:
            t_sd = time.perf_counter()
            model.train(False)
            sp = [builder._prompt_text(builder._prompt(sd_rng)[1]) for _ in range(sd.images)]
            scales = [sd_rng.uniform(*sd.cfg_range) for _ in sp]
            seeds = [sd_rng.randrange(2**31) for _ in sp]
            if sd.temperature_range is None:
                imgs = model.generate(sp, seeds, scales, temperature=sd.temperature)
            else:
                imgs, g = [], max(1, len(sp) // sd.temperature_groups)
                for i in range(0, len(sp), g):
                    imgs += model.generate(sp[i:i + g], seeds[i:i + g], scales[i:i + g],
                                           temperature=sd_rng.uniform(*sd.temperature_range))
            model.train()
            codes = codebook.encode(imgs)
            arrs = [np.asarray(im) for im in imgs]
            k = max(1, len(sp) // sd.workers)
            for i in range(0, len(sp), k):
                jobs.append(self_pool.apply_async(_self_label, ((sp[i:i + k], arrs[i:i + k], codes[i:i + k],
                                                                 sd_rng.randrange(2**31), cfg.corpus.mix.qa_per_seq),)))
            self_time += time.perf_counter() - t_sd
        while jobs and (jobs[0].ready() or len(jobs) > 4 * sd.workers):
            for s_ids, s_tg in jobs.pop(0).get():
                j = self_n % sd.buffer
                self_ids[j] = model.vocab.PAD
                self_ids[j, :len(s_ids)] = torch.tensor(s_ids)
                self_tg[j] = False
                self_tg[j, :len(s_tg)] = torch.tensor(s_tg)
                self_lens[j] = len(s_ids)
                self_n += 1
        b = torch.randint(0, ids_all.shape[0], (o.batch_size,), generator=gen)
        n_self = int(sd.share * o.batch_size) if (sd.every and self_n >= sd.min_fill) else 0
        if n_self:
            bs = torch.randint(0, min(self_n, sd.buffer), (n_self,), generator=gen)
            b = b[n_self:]
            T = int(max(lens_all[b].max(), self_lens[bs].max()))
            ids = torch.cat([ids_all[b, :T], self_ids[bs, :T]])
            tg = torch.cat([tg_all[b, :T], self_tg[bs, :T]])
            kd = torch.cat([kinds_all[b], torch.full((n_self,), S.KIND_IDS["question"], dtype=torch.long)])
        else:
            T = int(lens_all[b].max())
            ids, tg, kd = ids_all[b, :T], tg_all[b, :T], kinds_all[b]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, parts = model.token_loss(ids, tg, kd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), o.grad_clip)
        opt.step()
        acc_loss.append(loss.detach())
        for k, x in parts.items():
            acc.setdefault(k, []).append(x)
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == o.steps:
            rec = {"step": step + 1, "loss": float(torch.stack(acc_loss).float().mean()), "lr": lr,
                   "kinds": {k: float(torch.stack(x).float().mean()) for k, x in acc.items()},
                   "elapsed_s": round(time.perf_counter() - t_train, 1)}
            curve.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", q=f"{rec['kinds'].get('question', float('nan')):.3f}")
            acc_loss, acc = [], {}
        s = cfg.select
        timed_out = cfg.time_limit_s is not None and time.perf_counter() - t_start > cfg.time_limit_s
        if s.every and (step + 1) >= s.start and ((step + 1) % s.every == 0 or timed_out):
            model.train(False)
            model.weights_changed()
            ev = evaluate(model, n_prompts=s.n_prompts, seed=777)
            ev = {"step": step + 1, **{k: ev[k] for k in ("und_acc_gt", "gen_acc_oracle", "non_unification",
                                                          "judge_oracle_agreement")}}
            evals.append(ev)
            snaps[step + 1] = {k: v.detach().clone().cpu() for k, v in model.net.state_dict().items()}
            log(f"[pretrain] step {step + 1} eval {json.dumps(ev)}")
            if cfg.select.mode != "last" and _choose(evals, cfg.select) is ev:
                model.save_pretrained(out)  # the best so far survives a crash or a kill
            model.train()
        if timed_out:
            log(f"[pretrain] time limit {cfg.time_limit_s}s reached at step {step + 1}")
            break
    bar.close()
    train_s = time.perf_counter() - t_train
    if refresher is not None:
        refresher.close()
    if self_pool is not None:
        self_pool.terminate()
    model.train(False)
    chosen = _choose(evals, cfg.select)
    if chosen is not None and cfg.select.mode != "last":
        model.net.load_state_dict({k: v.to(dev) for k, v in snaps[chosen["step"]].items()})
    model.weights_changed()
    model.net.to("cpu")

    final = {}
    if cfg.eval_prompts:
        final = evaluate(model, n_prompts=cfg.eval_prompts)
    model.save_pretrained(out)
    (out / "recipe.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    info = {"steps_run": step + 1, "chosen_step": chosen["step"] if chosen else step + 1,
            "train_s": round(train_s, 1), "total_s": round(time.perf_counter() - t_start, 1),
            "device": str(dev), "params": model.num_params(), "corpus_refreshed": refreshed,
            "self_images": self_n, "self_data_s": round(self_time, 1),
            "torch": torch.__version__}
    metrics = {**final, "training": info, "snapshots": evals}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "curve.json").write_text(json.dumps({"curve": curve, "snapshots": evals}) + "\n")
    try:
        _plot_curve(curve, evals, out / "curve.png")
    except Exception as exc:  # matplotlib missing: the JSON curve stays
        log(f"[pretrain] no curve.png: {exc}")
    log(f"[pretrain] wrote {out} (model_id {model.model_id}) in {info['total_s']}s")
    return metrics


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
