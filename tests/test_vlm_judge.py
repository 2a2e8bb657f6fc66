"""The external VLM judge on a real vLLM engine (vLLM's CPU build, its own environment): a tiny random-weight
Qwen2-VL built locally, served by `vllm serve` on 127.0.0.1 and run in-process in an engine of that environment.
Random weights say random things: these tests check the transports, the structured output, the stage and its
faults, not what the judge thinks."""

import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from configs.loader import load_config
from configs.schema import CycleConfig
from flows.cycle import generate_flow, stage_flow
from model.vlm import VLMConfig, VLMUnreachableError, make_vlm
from model.vlm.geneval import suite_prompts
from model.vlm.server import free_port
from tasks import judge
from tasks.stage import StageContext, read, run_in_process
from tests.conftest import TINY_VLM

SMOKE = Path(__file__).resolve().parents[1] / "configs/cycle/smoke.yaml"


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (32 + 8 * (i % 4), 32), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
            for i in range(n)]


@pytest.fixture(scope="module")
def engine_cfg(tiny_vlm_dir):
    return VLMConfig(model=TINY_VLM, transport="inprocess", model_dir=str(tiny_vlm_dir))


@pytest.mark.slow
def test_both_transports_give_a_valid_verdict_every_time(vlm_server, engine_cfg):
    """Over 120 judgements (60 per transport) every answer is valid JSON with a 0-10 integer score; questions are
    answered with one of their choices."""
    prompts = [sp.prompt for sp in suite_prompts(10, 3)][:60]
    images = _images(60)
    for cfg in (VLMConfig(model=TINY_VLM, endpoint=vlm_server.url), engine_cfg):
        vlm = make_vlm(cfg)
        vlm.check()
        verdicts = vlm.judge(prompts, images)
        assert vlm.judge_id == f"vlm:{TINY_VLM}"
        assert len(verdicts) == 60 and all(v.parse_ok for v in verdicts), [v.raw for v in verdicts if not v.parse_ok]
        assert all(isinstance(v.score, int) and 0 <= v.score <= 10 for v in verdicts)
        assert all(json.loads(v.raw)["analysis"] == v.reasoning for v in verdicts)
        assert all(len(v.reasoning) <= cfg.max_analysis_chars for v in verdicts)
        said = vlm.answer(images[:6], ["How many dogs?"] * 6, [tuple("0123456")] * 6)
        assert all(a in tuple("0123456") for a in said)


def test_an_unreachable_endpoint_is_one_clear_error_before_any_work(tmp_path):
    port = free_port()  # nothing listens there
    cfg = VLMConfig(model=TINY_VLM, endpoint=f"http://127.0.0.1:{port}/v1", retries=0)
    with pytest.raises(VLMUnreachableError, match=f"127.0.0.1:{port}/v1 is unreachable"):
        make_vlm(cfg).check()


@pytest.mark.slow
def test_an_endpoint_serving_another_model_is_refused(vlm_server):
    with pytest.raises(VLMUnreachableError, match=f"serves \\['{TINY_VLM}'\\], not 'other-model'"):
        make_vlm(VLMConfig(model="other-model", endpoint=vlm_server.url)).check()


@pytest.fixture(scope="module")
def generated(tmp_path_factory, prefect_api):
    """A smoke run's generation side (the embedded model): rollouts to judge."""
    store = tmp_path_factory.mktemp("vlmrun")
    cfg = load_config(SMOKE, CycleConfig, [f"run.store={store}", "run.name=vlm", "propose.num_prompts=24",
                                           "rollout.samples_per_prompt=4", "rollout.prompts_per_shard=6"])
    generate_flow(cfg)
    return store, cfg


def _vlm_judge(url: str, **extra) -> list[str]:
    return ["judge.judge=vlm", "judge.vlm={model: %s, endpoint: '%s', retries: 1, backoff_s: 0.2}" % (TINY_VLM, url),
            "stages.retries=1", "stages.retry_delay_s=0.5", *[f"{k}={v}" for k, v in extra.items()]]


@pytest.mark.slow
def test_self_oracle_and_vlm_score_the_same_rollouts_side_by_side(generated, vlm_server):
    store, cfg = generated
    out = stage_flow("judge", "vlm", overrides=_vlm_judge(vlm_server.url), store=str(store), only=True)
    vlm_path = out["nodes"]["judge"]["outputs"]["judgements"]
    self_path = out["nodes"]["judge"]["recorded"]["judgements"]
    assert vlm_path != self_path
    ctx = StageContext(store=str(store), run="vlm")
    tables = {"self": _read_path(self_path), "vlm": _read_path(vlm_path)}
    oracle_inputs = {k: v for k, v in _recorded_inputs(store).items() if k in ("prompts", "rollouts")}
    tables["oracle"] = read(run_in_process(judge, oracle_inputs, cfg.judge.model_copy(update={"judge": "oracle"}),
                                           ctx)["judgements"]).to_pylist()
    keys = {n: sorted((r["prompt_id"], r["sample_idx"]) for r in t) for n, t in tables.items()}
    assert keys["self"] == keys["vlm"] == keys["oracle"] and len(keys["self"]) == 24 * 4
    assert {r["judge_id"] for r in tables["vlm"]} == {f"vlm:{TINY_VLM}"}
    assert all(r["parse_ok"] and 0 <= r["score"] <= 10 for r in tables["vlm"])
    # the endpoint and concurrency change how, not what: same fingerprint; another model: another dataset
    again = stage_flow("judge", "vlm", overrides=_vlm_judge(vlm_server.url) + [
        "judge.vlm.concurrency=2", "judge.vlm.timeout_s=30"], store=str(store), only=True)
    assert again["nodes"]["judge"]["outputs"]["judgements"] == vlm_path


def _recorded_inputs(store) -> dict:
    from storage import RunRecords

    rec = RunRecords(str(store), "vlm").load(None)
    return {**rec.nodes["propose"].outputs, **rec.nodes["rollout"].outputs}


def _read_path(path: str) -> list[dict]:
    """Every row of a dataset folder's parts."""
    import pyarrow.parquet as pq

    return [r for f in sorted(Path(path).glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.mark.slow
def test_a_killed_server_fails_the_stage_clearly_and_a_rerun_completes_exactly(generated, tiny_vlm_dir):
    """The server dies mid-judge: the shard retries, then the stage fails with one message naming the endpoint;
    after a restart on the same address the rerun keeps the parts already written and completes with every
    rollout judged exactly once."""
    from model.vlm.server import VLLMServer

    store, _ = generated
    server = VLLMServer(tiny_vlm_dir, served_name=TINY_VLM, port=free_port())
    server.start()
    overrides = _vlm_judge(server.url, **{"judge.vlm.max_analysis_chars": 120})  # its own dataset
    before = set(Path(store, "vlm").glob("judgements-*"))
    part0: list[Path] = []

    def kill_after_first_part():
        deadline = time.time() + 300
        while time.time() < deadline:
            found = [p / "part-00000.parquet" for p in set(Path(store, "vlm").glob("judgements-*")) - before
                     if (p / "part-00000.parquet").exists()]
            if found:
                part0.extend(found)
                server.stop()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_part)
    killer.start()
    try:
        with pytest.raises(VLMUnreachableError, match=server.url.split("//")[1]):
            stage_flow("judge", "vlm", overrides=overrides, store=str(store), only=True)
    finally:
        killer.join()
        server.stop()
    assert part0, "the server was never killed mid-stage"
    first_written = part0[0].stat().st_mtime_ns
    assert not (part0[0].parent / "_manifest.json").exists()  # not committed: the stage did not finish

    server.start()  # the same port: the recorded endpoint works again
    try:
        out = stage_flow("judge", "vlm", overrides=overrides, store=str(store), only=True)
    finally:
        server.stop()
    rows = _read_path(out["nodes"]["judge"]["outputs"]["judgements"])
    keys = [(r["prompt_id"], r["sample_idx"]) for r in rows]
    assert len(keys) == len(set(keys)) == 24 * 4
    assert part0[0].stat().st_mtime_ns == first_written  # the part written before the kill was kept

