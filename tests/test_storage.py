"""The artifact store on real files and real processes: kills, corruption, concurrent writers, names."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image
from model.ids import checkpoint_id_of_file

from storage import (CorruptPartError, DatasetRef, InvalidNameError, Registry, RegistryError, build, fingerprint,
                     from_png, to_png, validate_name)

N_PARTS, ROWS = 8, 25
WRITER = [sys.executable, str(Path(__file__).with_name("_writer.py"))]
ROOT = Path(__file__).resolve().parents[1]


def ref_for(store):
    return DatasetRef(store=str(store), run="r1", stage="rollouts", fingerprint="ab" * 32)


def start_writer(store, log, delay):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([*WRITER, str(store), str(N_PARTS), str(ROWS), str(delay), str(log)], env=env)


def computed(log):
    return [int(x) for x in Path(log).read_text().split()] if Path(log).exists() else []


def check_complete(store):
    ds = ref_for(store).open()
    assert ds.verify() == []
    t = ds.read()
    assert t.num_rows == N_PARTS * ROWS
    ids = t.column("sample_idx").to_pylist()
    assert sorted(ids) == list(range(N_PARTS * ROWS))  # every row once, none duplicated
    return t


def test_sigkill_mid_write_leaves_no_manifest_and_rerun_completes(tmp_path):
    log = tmp_path / "log"
    proc = start_writer(tmp_path, log, delay=0.4)
    deadline = time.time() + 60
    while len(computed(log)) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ds = ref_for(tmp_path).open()
    assert not ds.exists(), "a killed writer must not leave a manifest"
    done_before = [i for i in range(N_PARTS) if ds.committed_part(i) is not None]
    assert 2 <= len(done_before) < N_PARTS
    log.unlink()
    subprocess.run([*WRITER, str(tmp_path), str(N_PARTS), str(ROWS), "0", str(log)], check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert sorted(computed(log)) == [i for i in range(N_PARTS) if i not in done_before]  # only missing parts
    check_complete(tmp_path)


def test_two_processes_writing_the_same_dataset_end_consistent(tmp_path):
    log = tmp_path / "log"
    procs = [start_writer(tmp_path, log, delay=0.1) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    check_complete(tmp_path)
    assert sorted(computed(log)) == list(range(N_PARTS))  # each shard computed by exactly one process


def _table(i):
    return pa.table({"sample_idx": list(range(i * ROWS, (i + 1) * ROWS)),
                     "image": [to_png(Image.new("RGB", (8, 8), (i * 20, 0, 0)))] * ROWS})


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_part_is_detected_and_recomputed(tmp_path, damage):
    ref = ref_for(tmp_path)
    kw = dict(config={}, upstream={}, model_id=None, code_version="1", log=lambda _: None)
    build(ref, N_PARTS, _table, **kw)
    path = Path(ref.open().part_path(3))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    problems = ref.open().verify()
    assert len(problems) == 1 and "part-00003" in problems[0]
    with pytest.raises(CorruptPartError, match="part-00003"):
        ref.open().read()
    messages = []
    res = build(ref, N_PARTS, _table, **{**kw, "log": messages.append})
    assert res.computed_parts == [3] and not res.reused
    assert any("part-00003" in m for m in messages)
    check_complete(tmp_path)


def test_reuse_and_fingerprints(tmp_path):
    ref = ref_for(tmp_path)
    kw = dict(config={}, upstream={}, model_id=None, code_version="1")
    first = build(ref, 2, _table, **kw)
    again = build(ref, 2, _table, **kw)
    assert not first.reused and again.reused and again.computed_parts == []
    base = fingerprint("judge", {"rubric": {"a": 1}}, {"rollouts": "f" * 64}, "ckpt", "1")
    assert base == fingerprint("judge", {"rubric": {"a": 1}}, {"rollouts": "f" * 64}, "ckpt", "1")
    for other in [fingerprint("judge", {"rubric": {"a": 2}}, {"rollouts": "f" * 64}, "ckpt", "1"),
                  fingerprint("judge", {"rubric": {"a": 1}}, {"rollouts": "e" * 64}, "ckpt", "1"),
                  fingerprint("judge", {"rubric": {"a": 1}}, {"rollouts": "f" * 64}, "ckpt2", "1"),
                  fingerprint("judge", {"rubric": {"a": 1}}, {"rollouts": "f" * 64}, "ckpt", "2"),
                  fingerprint("select", {"rubric": {"a": 1}}, {"rollouts": "f" * 64}, "ckpt", "1")]:
        assert other != base


def test_datasets_open_in_polars_pandas_and_hf_datasets(tmp_path):
    import datasets
    import pandas as pd
    import polars as pl

    ref = ref_for(tmp_path)
    build(ref, 3, _table, config={}, upstream={}, model_id=None, code_version="1")
    files = ref.open().parquet_files()
    assert pl.read_parquet(f"{ref.path}/*.parquet").height == 3 * ROWS
    assert len(pd.concat(pd.read_parquet(f) for f in files)) == 3 * ROWS
    hf = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == 3 * ROWS
    assert from_png(hf[0]["image"]).getpixel((0, 0)) == (0, 0, 0)


def test_png_round_trip():
    img = Image.new("RGB", (32, 32), (10, 200, 30))
    img.putpixel((5, 7), (255, 0, 255))
    back = from_png(to_png(img))
    assert back.size == (32, 32) and back.tobytes() == img.tobytes()


@pytest.mark.parametrize("bad", ["../x", "/x", "a/b", "..", "", ".hidden", "x" * 101, "a b"])
def test_bad_names_are_refused(bad, tmp_path):
    with pytest.raises(InvalidNameError):
        validate_name(bad)
    with pytest.raises(ValueError):
        DatasetRef(store=str(tmp_path), run=bad, stage="rollouts", fingerprint="ab" * 32)
    assert not any(tmp_path.iterdir())


def test_checkpoint_registry_lineage_and_atomic_promotion(tmp_path):
    from safetensors.torch import save_file
    import torch

    reg = Registry(str(tmp_path / "store"))
    ids = []
    for cycle in range(2):
        src = tmp_path / f"ck{cycle}"
        src.mkdir()
        save_file({"w": torch.full((4,), float(cycle))}, str(src / "model.safetensors"))
        (src / "config.json").write_text('{"d": 4}')
        meta = reg.register(str(src), checkpoint_id_of_file(src / "model.safetensors"), parent=ids[-1] if ids else None,
                            cycle=cycle, data_fingerprint="d" * 12,
                            metrics={"gen_acc_oracle": 0.5 + cycle / 10})
        ids.append(meta.checkpoint_id)
    assert reg.promoted() is None
    reg.promote(ids[0])
    assert reg.promoted().checkpoint_id == ids[0]
    reg.promote(ids[1])
    assert reg.promoted().checkpoint_id == ids[1]
    assert [m.checkpoint_id for m in reg.lineage(ids[1])] == [ids[1], ids[0]]
    assert [m.cycle for m in reg.list()] == [0, 1]
    local = Path(reg.local_dir(ids[1]))
    (local / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RegistryError, match="checksum"):
        reg.local_dir(ids[1])
    with pytest.raises(RegistryError):
        reg.promote("0123456789abcdef")
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "model.safetensors").write_bytes(b"x")
    (pkl / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(RegistryError, match="pickle"):
        reg.register(str(pkl), "0123456789abcdef")
