"""Typed configs of a self-play cycle: one small model per component, the recipe is plain YAML over them.

Each stage's section is part of that stage's fingerprint, so only what changes the stage's output belongs in it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from configs.loader import FloatPair, IntPair, Strict
from model.registry import ModelSection
from model.vlm.geneval import CAPACITY as GENEVAL_CAPACITY
from model.vlm.judge import VLMConfig
from storage.names import validate_name

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str) -> Path:
    """A recipe's relative path: from the working directory if it exists there, else from the project root;
    absolute either way, so every process (a posttrain worker runs elsewhere) means the same file."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() or p.exists() else PROJECT_ROOT / p).resolve()


def read_seed_file(path: str | Path) -> dict[str, list[str]]:
    """category -> seed prompts, from a YAML mapping of non-empty lists."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"no such seed file: {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"seed file {path} is not readable YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, list) and v for v in data.values()):
        raise ValueError(f"seed file {path}: expected a mapping of category -> non-empty list of seed prompts")
    return {str(k): [str(p) for p in v] for k, v in data.items()}


def resolve_store(url: str) -> str:
    """A local store as an absolute path, resolved once in the launching process; any other fsspec URL as is."""
    if "://" in url and not url.startswith("file://"):
        return url
    return str(Path(url.removeprefix("file://")).expanduser().resolve())


class RunConfig(Strict):
    name: str = Field("tiny", description="run name: the folder under the store")
    store: str = Field("./runs", description="artifact store: a local folder or any fsspec URL")
    seed: int = Field(0, ge=0, description="base seed of every random choice in the cycle")
    cycle: int = Field(0, ge=0)
    cluster: str = Field("local", description="where shards run: 'local' (this process), 'dask' (a Dask cluster "
                         "started for the run: one worker per GPU, or stages.workers single-threaded processes on a "
                         "CPU machine) or an existing Dask scheduler's address, tcp://host:8786")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v, "run name")

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the store is empty: give a folder or an fsspec URL")
        return resolve_store(v)

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, v: str) -> str:
        if v not in ("local", "dask") and not re.fullmatch(r"(tcp|tls|ucx)://[^\s/]+(:\d+)?", v):
            raise ValueError(f"expected 'local', 'dask' or a Dask scheduler address such as tcp://host:8786, got {v!r}")
        return v


def _model_section(data: Any) -> ModelSection:
    from model import registry

    try:
        cfg = registry.section(data)
    except registry.UnknownBackendError as exc:
        raise ValueError(f"model.backend: {exc}") from None
    validate_name(cfg.registry_line, "model.registry_line")
    return cfg


# The `model` section is a union discriminated by `backend`, open to registration: each registered backend
# (model/registry.py) validates its own arm, so a new backend needs no edit here.
ModelConfig = Annotated[SerializeAsAny[ModelSection], BeforeValidator(_model_section)]


class ProposeConfig(Strict):
    num_prompts: int = Field(64, ge=1, le=1_000_000)
    seed_file: str = Field("configs/seeds/shapeworld.yaml", validate_default=True,
                           description="category -> seed prompts (YAML)")
    category_shares: dict[str, float] = Field(default_factory=dict)
    examples_per_call: IntPair = (1, 3)
    temperature: float = Field(0.8, gt=0, le=2.0)
    discard_pool_share: float = Field(0.25, ge=0, le=1, description="max share of prompts taken from the pool")
    max_attempts_factor: int = Field(4, ge=1, le=50, description="proposal calls per wanted prompt, at most")

    @field_validator("examples_per_call")
    @classmethod
    def _examples(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"expected [least, most] few-shot examples with 1 <= least <= most, got {list(v)}")
        return v

    @field_validator("seed_file")
    @classmethod
    def _seed_file(cls, v: str) -> str:
        path = resolve_path(v)
        read_seed_file(path)
        return str(path)

    @field_validator("category_shares")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        if any(s < 0 for s in v.values()):
            raise ValueError("category shares must be >= 0")
        if v and sum(v.values()) <= 0:
            raise ValueError("category shares must not all be 0")
        return v

    @model_validator(mode="after")
    def _categories(self) -> "ProposeConfig":
        known = read_seed_file(self.seed_file)
        unknown = sorted(set(self.category_shares) - set(known))
        if unknown:
            raise ValueError(f"category_shares names {unknown}, which the seed file {self.seed_file} has no seed "
                             f"prompts for (its categories: {', '.join(known)})")
        return self


class RolloutConfig(Strict):
    samples_per_prompt: int = Field(8, ge=1, le=64)
    pool_samples_per_prompt: int | None = Field(None, ge=1, le=64, description="samples for a prompt that returns "
                                                "from the discard pool (curriculum); default: samples_per_prompt")
    cfg_min: float = Field(3.0, ge=0)
    cfg_max: float = Field(8.0, ge=0)
    sampling: dict = Field(default_factory=dict, description="the backend's sampling parameters (embedded, "
                           "janus: temperature, top_k), checked against its registered class")
    prompts_per_shard: int = Field(32, ge=1)
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _cfg_range(self) -> "RolloutConfig":
        if self.cfg_min > self.cfg_max:
            raise ValueError(f"cfg_min ({self.cfg_min}) must be <= cfg_max ({self.cfg_max})")
        return self


class JudgeConfig(Strict):
    judge: str = Field("self", description="'self' (the model's own judge), 'oracle' (measuring only) or 'vlm' (an "
                       "external VLM served by vLLM: a teacher, so a run it selects for is not self-play)")

    @field_validator("judge")
    @classmethod
    def _judge(cls, v: str) -> str:
        from model.judges import JUDGES

        if v not in JUDGES:
            raise ValueError(f"unknown judge {v!r}: expected one of {', '.join(JUDGES)}")
        return v
    rubric: dict = Field(default_factory=dict, description="overrides of the world's default rubric")
    vlm: VLMConfig | None = Field(None, description="judge 'vlm': the served model and how to reach it")
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _vlm(self) -> "JudgeConfig":
        if self.judge == "vlm" and self.vlm is None:
            raise ValueError("judge 'vlm' needs a vlm section: {model: SERVED_NAME, endpoint: http://HOST:PORT/v1}")
        return self


class SelectConfig(Strict):
    threshold: float = Field(7.0, ge=0, le=10)
    seed: int = Field(0, ge=0, description="tie-breaking RNG")
    pool_max_tries: int = Field(3, ge=1, description="cycles a prompt may stay in the discard pool")
    seed_min_score: float = Field(10.0, ge=0, le=10, description="best score that makes a prompt a future seed")
    seeds_per_category: int = Field(64, ge=1, description="seed library size per category (newest kept)")


class ReconstructConfig(Strict):
    """Cognitive Pattern Reconstruction: the mixture of the four kinds, in proportions (UniCorn: 5:5:3:1)."""

    mixture: dict[Literal["generation", "caption", "judgement", "reflection"], float] = Field(
        default_factory=lambda: {"generation": 5, "caption": 5, "judgement": 3, "reflection": 1})
    generation_min_score: float = Field(7.0, ge=0, le=10, description="best score a generation pair needs")
    reflection_min_best: float = Field(8.0, ge=0, le=10, description="reflection groups: max score > this")
    reflection_min_gap: float = Field(3.0, ge=0, le=10, description="reflection groups: max - min >= this")
    heldout_share: float = Field(0.1, ge=0, lt=1, description="prompts kept out of training, for held-out loss")
    seed: int = Field(0, ge=0)

    @field_validator("mixture")
    @classmethod
    def _mix(cls, v: dict[str, float]) -> dict[str, float]:
        if any(x < 0 for x in v.values()) or not v.get("generation", 0) > 0:
            raise ValueError("mixture weights must be >= 0 and generation must be > 0")
        return v


class PosttrainConfig(Strict):
    """DeepSpeed post-training; UniCorn's recipe shape (AdamW 0.9/0.95, wd 0, clip 1.0, EMA), scaled to the model."""

    objective: Literal["sft", "dpo", "grpo"] = Field("sft", description="sft: the CPR mixture; dpo: best vs "
                                                      "worst image pairs; grpo: every scored rollout, group-relative")
    steps: int = Field(200, ge=1)
    micro_batch: int = Field(32, ge=1, description="examples per rank per micro-step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    betas: FloatPair = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    cfg_dropout: float = Field(0.1, ge=0, lt=1, description="share of image targets trained without their prompt, "
                               "so the unconditional branch that classifier-free guidance needs does not drift")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="0 = no EMA; UniCorn: 0.99")
    export: Literal["ema", "raw"] = "raw"
    checkpoint_every: int = Field(50, ge=1)
    nproc: int | Literal["auto"] = Field("auto", description="ranks: 'auto' is one per GPU of the machine (one "
                                         "process on a CPU machine); or a number (GPUs, or CPU processes with gloo)")

    @field_validator("nproc")
    @classmethod
    def _nproc(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("nproc must be >= 1 or 'auto'")
        return v
    zero_stage: int = Field(2, ge=0, le=2)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    dpo_beta: float = Field(0.1, gt=0)
    dpo_nll_weight: float = Field(1.0, ge=0)
    grpo_clip: float = Field(0.2, gt=0, lt=1, description="PPO clip range of the per-token probability ratio")
    grpo_kl: float = Field(0.04, ge=0, description="weight of KL(policy || parent) per token")
    grpo_sft_weight: float = Field(0.0, ge=0, description="grpo: also train the CPR examples (SFT) in the same "
                                   "batches, at this weight beside the group loss (0: GRPO alone)")
    loss_weights: dict[Literal["generation", "caption", "judgement", "reflection"], float] = Field(
        default_factory=dict, description="per-kind SFT loss weights over the backend's own defaults; each kind's "
        "token-mean loss counts as many times as the batch has examples of that kind, times its weight")
    freeze: list[str] = Field(default_factory=list, description="parameters that stay fixed: fnmatch patterns over "
                              "the backend module's parameter names (e.g. 'fac_*', 'blocks.0.*'); each must match one")
    seed: int = Field(0, ge=0)
    timeout_s: int = Field(3600, ge=10)
    # speed only (outside the stage's fingerprint, tasks/posttrain.py SPEED_ONLY): what is learned stays the same
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile the backend's repeated layers (a "
                                            "compiler that fails falls back to eager with a warning); 'auto': on "
                                            "a GPU only")
    loss_chunk: int = Field(4096, ge=0, description="tokens per chunk of the backend's output head and fp32 "
                            "cross-entropy under activation checkpointing (less peak memory, the same loss); 0: whole")


# the largest benchmark suite: propose holds out all of it, whatever a run's own size (tasks/suite.py)
SUITE_MAX_PER_CATEGORY = 100


class BenchmarkConfig(Strict):
    """The held-out suite: prompts per category x samples, fixed seeds (paired parent/child comparison).

    `suite: shapeworld` is the embedded world's, measured by its exact oracle. `suite: geneval` is the real-model
    suite (GenEval's six categories, per-prompt questions), measured by an external VLM (`evaluator: vlm`): its
    verdict on each image and its answers to the prompt's questions (UniCycle)."""

    suite: Literal["shapeworld", "geneval"] = "shapeworld"
    evaluator: Literal["oracle", "vlm"] = Field("oracle", description="who measures the images: the world's oracle "
                                                "(shapeworld only) or the external VLM (either suite)")
    vlm: VLMConfig | None = Field(None, description="evaluator 'vlm': the served model and how to reach it")
    prompts_per_category: int = Field(100, ge=1, le=SUITE_MAX_PER_CATEGORY, description="at most "
                                      f"{SUITE_MAX_PER_CATEGORY}: every larger suite's prompts would be held out "
                                      "from training too")
    samples: int = Field(8, ge=1, le=64)
    cfg_scale: float = Field(3.0, ge=0)
    sampling: dict = Field(default_factory=dict, description="the backend's sampling parameters, as rollout's")
    threshold: float = Field(7.0, ge=0, le=10)
    suite_seed: int = Field(7_000_001, ge=0)
    bootstrap: int = Field(1000, ge=100)

    @model_validator(mode="after")
    def _evaluator(self) -> "BenchmarkConfig":
        if self.evaluator == "vlm" and self.vlm is None:
            raise ValueError("evaluator 'vlm' needs a vlm section: {model: SERVED_NAME, endpoint: http://HOST:PORT/v1}")
        if self.suite == "geneval" and self.prompts_per_category > min(GENEVAL_CAPACITY.values()):
            raise ValueError(f"suite 'geneval' offers at most {min(GENEVAL_CAPACITY.values())} prompts per category "
                             f"(its single_object category), not {self.prompts_per_category}")
        want = {"shapeworld": "oracle", "geneval": "vlm"}[self.suite]
        if self.evaluator != want:
            raise ValueError(f"suite {self.suite!r} is measured by evaluator {want!r} (its metrics: "
                             f"{', '.join(evaluator_metrics(want))}), not {self.evaluator!r}")
        return self


# what the benchmark measures per prompt, so parent and child compare pairwise (tasks/stats.py per_prompt); the
# evaluator's own metrics are named after it (the world's oracle: ShapeWorld suite; an external VLM: GenEval-style)
PairedMetric = Literal["gen_acc_oracle", "best_of_n_self", "pass_at_n_oracle", "non_unification",
                       "judge_oracle_agreement", "unicycle_soft", "unicycle_hard", "und_acc_gt", "und_acc_perturbed",
                       "gen_acc_vlm", "pass_at_n_vlm", "judge_vlm_agreement", "und_acc_vlm"]
_EVALUATOR_METRICS = {"oracle": ("gen_acc_oracle", "pass_at_n_oracle", "judge_oracle_agreement", "und_acc_gt",
                                 "und_acc_perturbed"),
                      "vlm": ("gen_acc_vlm", "pass_at_n_vlm", "judge_vlm_agreement", "und_acc_vlm")}


def evaluator_metrics(evaluator: str) -> tuple[str, ...]:
    """The paired metrics only this evaluator measures."""
    return _EVALUATOR_METRICS[evaluator]


class GateConfig(Strict):
    """Promotion: the child replaces the parent only if generation improves and understanding holds."""

    metric: PairedMetric = "gen_acc_oracle"
    min_gain: float = Field(0.0, description="child - parent must exceed this")
    require_significant: bool = Field(False, description="also require the paired 95 % interval above 0")
    understanding_metric: PairedMetric = "und_acc_gt"
    max_understanding_drop: float = Field(0.01, ge=0)
    promote: bool = Field(True, description="move the promoted pointer to a child that passes (false: decide "
                          "and record only)")


class StageCacheConfig(Strict):
    """How shards run: retries of a failed shard (delays grow exponentially from `retry_delay_s`) and, with
    `run.cluster` other than local, how many workers each stage may use. None of it enters a fingerprint."""

    retries: int = Field(2, ge=0, le=10)
    retry_delay_s: float = Field(2.0, gt=0)
    workers: int = Field(2, ge=1, le=256, description="run.cluster=dask on a CPU machine: worker processes")
    threads_per_worker: int = Field(1, ge=1, le=64, description="torch threads in each CPU worker process")
    scale: dict[str, int] = Field(default_factory=dict, description="stage -> the most workers its shards may use "
                                  "(e.g. rollout: 8, judge: 4); a stage not named may use every worker")

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"each stage needs at least one worker, got {bad}")
        return v


class CycleConfig(Strict):
    run: RunConfig = RunConfig()
    model: ModelConfig = Field(default_factory=lambda: _model_section({"backend": "embedded"}))
    propose: ProposeConfig = ProposeConfig()
    rollout: RolloutConfig = RolloutConfig()
    judge: JudgeConfig = JudgeConfig()
    select: SelectConfig = SelectConfig()
    reconstruct: ReconstructConfig = ReconstructConfig()
    posttrain: PosttrainConfig = PosttrainConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    gate: GateConfig = GateConfig()
    stages: StageCacheConfig = StageCacheConfig()

    @model_validator(mode="after")
    def _gate_metrics(self) -> "CycleConfig":
        other = next(e for e in _EVALUATOR_METRICS if e != self.benchmark.evaluator)
        for name in ("metric", "understanding_metric"):
            m = getattr(self.gate, name)
            if m in _EVALUATOR_METRICS[other]:
                raise ValueError(f"gate.{name}: {m!r} is measured by the {other!r} evaluator, but this benchmark's "
                                 f"is {self.benchmark.evaluator!r} (its own: "
                                 f"{', '.join(_EVALUATOR_METRICS[self.benchmark.evaluator])})")
        return self

    @model_validator(mode="after")
    def _rubric(self) -> "CycleConfig":
        # the rubric's shape belongs to the backend's world: check it now, not when the judge first runs
        from model import registry

        backend = registry.get(self.model.backend)
        if backend.check_rubric is not None:
            backend.check_rubric(self.judge.rubric)
        for name in ("rollout", "benchmark"):  # typed by the backend, stored resolved (defaults filled in)
            section = getattr(self, name)
            try:
                typed = backend.sampling.model_validate(section.sampling)
            except ValidationError as exc:
                e = exc.errors()[0]
                where = ".".join(str(p) for p in e["loc"])
                raise ValueError(f"{name}.sampling.{where}: {e['msg'].lower()} (backend {backend.name!r} samples "
                                 f"with {', '.join(backend.sampling.model_fields)})") from None
            section.__dict__["sampling"] = typed.model_dump(mode="json")
        return self
