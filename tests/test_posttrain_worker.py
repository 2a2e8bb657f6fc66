"""The posttrain worker's bookkeeping: the EMA update and its shares per rank, FLOPs per example kind, throughput without warm-up."""

import pytest
import torch

from model.protocol import CPRExample
from tasks import posttrain_worker as W


def test_the_grouped_ema_is_the_per_tensor_update(monkeypatch):
    monkeypatch.setattr(W, "EMA_GROUP", 50)  # several groups, one of them a single large tensor
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (7,), "b": (10, 10), "c": (3, 4), "d": (30,)}
    ema = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    cur = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    want = {k: v.clone().mul_(0.99).add_(cur[k].float(), alpha=1 - 0.99) for k, v in ema.items()}
    W.ema_update(ema, cur, 0.99)
    assert all(torch.equal(ema[k], want[k]) for k in shapes)


def test_ema_shares_split_the_trained_tensors_between_ranks():
    net = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                              torch.nn.Linear(8, 50))
    net[0].weight.requires_grad_(False)  # frozen: its average is itself
    net.register_buffer("scale", torch.ones(3))
    trained = [n for n, p in net.named_parameters() if p.requires_grad]
    sizes = dict((n, p.numel()) for n, p in net.named_parameters())
    for world in (1, 2, 3, 5):
        shares = [W.ema_shard(net, r, world) for r in range(world)]
        assert [k for s in shares for k in s] == trained, world  # each once, in the state dict's order
        for s in shares:  # about 1/world of the elements each: off by less than one tensor
            assert abs(sum(sizes[k] for k in s) - sum(sizes[k] for k in trained) / world) <= max(sizes.values())
    assert W.ema_shard(net, 1, 2) and W.ema_shard(net, 0, 2) != W.ema_shard(net, 1, 2)


class _Plain:
    """A backend without `params_on_path`: all its parameters count."""

    def __init__(self):
        self.net = torch.nn.Linear(3, 4)  # 16 parameters

    def tokens_per_example(self, ex):
        return len(ex.input_text)


class _Pathed(_Plain):
    def params_on_path(self, kind):
        return {"generation": 10, "caption": 2}[kind]


def test_flops_count_each_kinds_path_or_all_parameters_without_one():
    batch = [CPRExample("generation", "abc"), CPRExample("caption", "de"), CPRExample("generation", "f")]
    assert W.batch_work(_Plain(), batch, {}) == (6, 6 * 16 * 6)
    path: dict = {}
    assert W.batch_work(_Pathed(), batch, path) == (6, 6 * (3 * 10 + 2 * 2 + 1 * 10))
    assert path == {"generation": 10, "caption": 2}


def test_throughput_leaves_the_warmup_steps_out_and_says_what_the_wall_gives():
    slow, fast = (9.0, 4, 100, 6e14), (1.0, 4, 100, 6e14)  # (seconds, examples, tokens, FLOPs)
    done = {"steps": [slow, slow, fast, fast], "train_s": 25.0, "checkpoint_s": 5.0, "path": {"generation": 1}}
    t = W.throughput(done, world=1, cuda=True)
    assert t["timed_steps"] == 2 and t["warmup_s"] == 18.0 and t["step_s"] == 1.0
    assert t["tokens_per_s"] == 100.0 and t["tokens_per_s_wall"] == 16.0 and t["tokens"] == 400
    assert t["mfu"] == pytest.approx(6e14 / W.PEAK_BF16_FLOPS, abs=1e-5)
    assert t["mfu_wall"] == pytest.approx(4 * 6e14 / 25.0 / W.PEAK_BF16_FLOPS, abs=1e-5)
    assert W.throughput(done, world=2, cuda=True)["mfu"] == pytest.approx(t["mfu"] / 2, abs=1e-5)
    short = W.throughput({**done, "steps": [slow, fast]}, world=1, cuda=False)  # too few steps: all are timed
    assert short["timed_steps"] == 2 and short["step_s"] == 5.0 and "mfu" not in short
    assert t["step_times"] == [9.0, 9.0, 1.0, 1.0]  # every step, to spot a recompile among them
    profiled = W.throughput({**done, "steps": [slow, slow, slow, fast, fast], "untimed": 3}, world=1, cuda=True)
    assert profiled["timed_steps"] == 2 and profiled["step_s"] == 1.0  # the profiled step is not timed


def test_compile_and_loss_chunk_stay_out_of_the_stages_fingerprint_and_the_rank_count_enters_it(tmp_path):
    from configs.schema import PosttrainConfig
    from storage import DatasetRef
    from tasks import posttrain
    from tasks.stage import StageContext

    ctx = StageContext(store=str(tmp_path), run="r", model_id="m" * 16)
    inputs = {k: DatasetRef(store=str(tmp_path), run="r", stage=k, fingerprint="ab" * 16) for k in ("cpr", "dpo_pairs")}
    fp = lambda **kw: posttrain.plan_of(inputs, PosttrainConfig(**kw), ctx).ref.fingerprint  # noqa: E731
    assert fp() == fp(compile=True, loss_chunk=0) == fp(compile=False, loss_chunk=512)
    assert fp() != fp(lr=2e-4)  # what is learned does enter it
    # the rank count does too (micro_batch is per rank), as 'auto' resolves it on this machine
    assert fp(nproc=1) == fp(timeout_s=60) != fp(nproc=2) != fp(nproc=4)
    assert fp(nproc="auto") == fp(nproc=posttrain.rank_count("auto"))
