"""No damaged file becomes a checkpoint: the registry checks its files wherever they are used, promoted or
re-registered, and the trainer's `final/` is checked against the checksums it wrote before reuse."""

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from flows.cli import app
from model.ids import checkpoint_id_of_file
from storage import Registry, RegistryError, read_checksums, write_checksums
from tasks.posttrain import final_problems

runner = CliRunner()


def weights_dir(path: Path, value: float = 1.0) -> Path:
    path.mkdir(parents=True)
    save_file({"w": torch.full((64,), value)}, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"d": 64}')
    return path


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def registered(tmp_path, value: float = 1.0) -> tuple[Registry, str, Path]:
    """A registry with one checkpoint; returns it, the id and the source directory."""
    src = weights_dir(tmp_path / f"src{value}", value)
    reg = Registry(str(tmp_path / "store"))
    ckpt = reg.register(str(src), checkpoint_id_of_file(src / "model.safetensors")).checkpoint_id
    return reg, ckpt, src


def stored(reg: Registry, ckpt: str) -> Path:
    return Path(reg.root) / ckpt


def cli(*args):
    return runner.invoke(app, ["checkpoints", *args])


def test_promote_refuses_a_damaged_checkpoint(tmp_path):
    reg, ckpt, _ = registered(tmp_path)
    assert reg.verify(ckpt) == []
    flip_byte(stored(reg, ckpt) / "model.safetensors")
    assert reg.verify(ckpt) == ["model.safetensors: does not match its checksum"]
    with pytest.raises(RegistryError, match="damaged.*selfplay checkpoints verify"):
        reg.promote(ckpt)
    assert reg.promoted() is None
    res = cli("promote", ckpt, "--store", str(tmp_path / "store"))
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "damaged" in res.output
    (stored(reg, ckpt) / "config.json").unlink()
    assert "config.json: missing" in reg.verify(ckpt)


def test_list_flags_damage_and_refuses_a_missing_registry(tmp_path):
    reg, ckpt, _ = registered(tmp_path)
    reg2_src = weights_dir(tmp_path / "other", 2.0)
    other = reg.register(str(reg2_src), checkpoint_id_of_file(reg2_src / "model.safetensors")).checkpoint_id
    reg.promote(ckpt)
    flip_byte(stored(reg, other) / "model.safetensors")
    (stored(reg, ckpt) / "_meta.json").write_text("{")  # unreadable: listed as damaged, not a traceback
    res = cli("list", "--store", str(tmp_path / "store"))
    assert res.exit_code == 0, res.output
    rows = {r["checkpoint_id"]: r for r in map(json.loads, res.output.splitlines())}
    assert not rows[other]["intact"] and rows[other]["problems"] == ["model.safetensors: does not match its checksum"]
    assert not rows[ckpt]["intact"] and "_meta.json: unreadable" in rows[ckpt]["problems"][0]
    assert rows[ckpt]["promoted"] and not rows[other]["promoted"]
    for args in (["--store", str(tmp_path / "nonexistent")], ["--store", str(tmp_path / "store"), "--line", "../x"]):
        res = cli("list", *args)
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output


def test_verify_exit_codes(tmp_path):
    reg, ckpt, _ = registered(tmp_path)
    reg.promote(ckpt)
    store = str(tmp_path / "store")
    res = cli("verify", "--store", store)
    assert res.exit_code == 0, res.output
    lines = [json.loads(ln) for ln in res.output.splitlines()]
    assert lines[0] == {"checkpoint_id": ckpt, "intact": True, "problems": []}
    assert lines[-1] == {"checked": 1, "damaged": [], "promoted": ckpt, "promoted_ok": True}
    flip_byte(stored(reg, ckpt) / "model.safetensors")
    for args in ([], [ckpt]):
        res = cli("verify", *args, "--store", store)
        assert res.exit_code == 1, res.output
        summary = json.loads(res.output.splitlines()[-1])
        assert summary["damaged"] == [ckpt] and summary["promoted_ok"] is False
    assert cli("verify", "--store", str(tmp_path / "nonexistent")).exit_code == 2
    assert cli("verify", "0123456789abcdef", "--store", store).exit_code == 2
    assert cli("verify", "--store", store, "--line", "../x").exit_code == 2


@pytest.mark.parametrize("pointer", ['{"checkpoint_id": "0123456789abcdef"}', '{"checkpoint_id": "01', "[1]", ""])
def test_a_bad_promoted_pointer_is_one_error_naming_the_fix(tmp_path, pointer):
    reg, ckpt, _ = registered(tmp_path)
    path = Path(reg.root) / "promoted.json"
    path.write_text(pointer)
    with pytest.raises(RegistryError) as err:
        reg.promoted()
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "selfplay checkpoints promote" in msg and "delete" in msg
    res = cli("verify", "--store", str(tmp_path / "store"))
    summary = json.loads(res.output.splitlines()[-1])
    assert res.exit_code == 1 and summary["promoted_ok"] is False and summary["damaged"] == []


def test_a_rerun_repairs_a_damaged_copy_from_an_intact_source(tmp_path):
    reg, ckpt, src = registered(tmp_path)
    meta = reg.meta(ckpt)
    flip_byte(stored(reg, ckpt) / "model.safetensors")
    (stored(reg, ckpt) / "config.json").unlink()
    assert reg.register(str(src), ckpt, parent="someone-else") == meta  # first lineage kept
    assert reg.verify(ckpt) == []
    (stored(reg, ckpt) / "_meta.json").write_text("{")
    reg.register(str(src), ckpt)
    assert reg.verify(ckpt) == []
    reg.promote(ckpt)
    flip_byte(stored(reg, ckpt) / "model.safetensors")
    flip_byte(src / "model.safetensors")
    with pytest.raises(RegistryError, match="cannot repair"):
        reg.register(str(src), ckpt)
    assert reg.verify(ckpt) != []


def test_register_refuses_files_that_differ_from_their_writers_checksums(tmp_path):
    src = weights_dir(tmp_path / "final")
    (src / "_metrics.json").write_text("{}")
    write_checksums(str(src))
    expected = read_checksums(str(src))
    assert set(expected) == {"model.safetensors", "config.json", "_metrics.json"}
    flip_byte(src / "model.safetensors")
    reg = Registry(str(tmp_path / "store"))
    with pytest.raises(RegistryError, match="model.safetensors: does not match"):
        reg.register(str(src), checkpoint_id_of_file(src / "model.safetensors"), expected=expected)
    assert reg.ids() == []


def test_final_problems_detects_a_damaged_trainer_output(tmp_path):
    final = weights_dir(tmp_path / "final")
    (final / "_metrics.json").write_text('{"steps": 1}')
    assert final_problems(final)[0].endswith("_checksums.json: missing")
    write_checksums(str(final))
    assert final_problems(final) == []
    flip_byte(final / "model.safetensors")
    assert final_problems(final) == ["model.safetensors: does not match its checksum"]
    (final / "_checksums.json").write_text("{")
    assert final_problems(final)[0].endswith("_checksums.json: unreadable")


@pytest.fixture
def stand_in_posttrain(tmp_path, monkeypatch):
    """The posttrain stage around a stand-in trainer that exports `final/` as the worker does (weights, metrics,
    checksums, atomically), after a second's work; returns a call that runs the stage and the trainer's launches."""
    from configs.schema import PosttrainConfig
    from storage import DatasetRef
    from tasks import posttrain
    from tasks.stage import StageContext

    parent = weights_dir(tmp_path / "parent", 0.0)
    launches = []

    def trainer(job, out, nproc, timeout_s, log):
        launches.append(out)
        time.sleep(1.0)
        tmp = out / "final.tmp"
        save_file({"w": torch.full((64,), 3.0)}, str(weights_dir(tmp, 3.0) / "model.safetensors"))
        (tmp / "_metrics.json").write_text('{"steps": 1}')
        write_checksums(str(tmp))
        tmp.rename(out / "final")

    monkeypatch.setattr(posttrain, "launch", trainer)
    store = str(tmp_path / "store")
    ctx = StageContext(store=store, run="r", model_id=checkpoint_id_of_file(parent / "model.safetensors"),
                       model_dir=str(parent), log=lambda _: None)
    inputs = {k: DatasetRef(store=store, run="r", stage=k, fingerprint=c * 64) for k, c in (("cpr", "a"),
                                                                                            ("dpo_pairs", "b"))}
    cfg = PosttrainConfig.model_validate({"steps": 1})

    def run():
        return posttrain.run(inputs, cfg, ctx)["checkpoint"]

    run.final = posttrain.work_dir(posttrain.plan_of(inputs, cfg, ctx), ctx) / "final"
    run.store = store
    return run, launches


def test_posttrain_remakes_a_damaged_final_and_registers_only_verified_files(stand_in_posttrain):
    import shutil

    from tasks import posttrain

    run, launches = stand_in_posttrain

    def child() -> str:
        ref = run()
        row = posttrain.child_of(ref)
        shutil.rmtree(ref.path)  # the next call trains (or reuses `final/`) again instead of reusing this row
        return row["checkpoint_id"]

    first = child()
    assert len(launches) == 1 and child() == first and len(launches) == 1  # an intact final/ is reused
    flip_byte(run.final / "model.safetensors")
    assert child() == first and len(launches) == 2  # a damaged one is remade, not registered
    assert [m.checkpoint_id for m in Registry(run.store).list()] == [first]


def test_two_identical_posttrain_stages_train_once(stand_in_posttrain):
    """The second identical run waits for the first's lock, then reuses its child."""
    import threading

    from tasks import posttrain

    run, launches = stand_in_posttrain
    children = []
    threads = [threading.Thread(target=lambda: children.append(posttrain.child_of(run())["checkpoint_id"]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(launches) == 1 and len(children) == 2 and children[0] == children[1]
