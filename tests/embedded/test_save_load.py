"""Checkpoints: safetensors + config.json, id = sha256 of the weights file, exact round trip."""

import hashlib
import json

import numpy as np
import pytest
import torch

from model.embedded import BASE_DIR, EmbeddedUMM


def test_base_checkpoint_is_shipped_and_small():
    files = {p.name for p in BASE_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "metrics.json"} <= files
    total = sum(p.stat().st_size for p in BASE_DIR.iterdir())
    assert total <= 20 * 2**20
    assert not any(n.endswith((".pt", ".pth", ".bin", ".pkl")) for n in files)
    m = json.loads((BASE_DIR / "metrics.json").read_text())
    assert {"und_acc_gt", "gen_acc_oracle", "non_unification", "judge_oracle_agreement"} <= set(m)


def test_save_load_round_trip(base_model, world_batch, tmp_path):
    d = base_model.save_pretrained(tmp_path / "ckpt")
    data = (d / "model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest()[:16] == base_model.model_id
    header_len = int.from_bytes(data[:8], "little")
    assert json.loads(data[8:8 + header_len])  # a safetensors header, not a pickle
    m2 = EmbeddedUMM.from_pretrained(d)
    assert m2.model_id == base_model.model_id
    for (k, a), (k2, b) in zip(base_model.net.state_dict().items(), m2.net.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert (m2.codebook.masks == base_model.codebook.masks).all()
    assert m2.vocab.itos == base_model.vocab.itos
    p = world_batch[0][:3]
    a = base_model.generate(p, [1, 2, 3], [3.0] * 3)
    b = m2.generate(p, [1, 2, 3], [3.0] * 3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_model_id_follows_the_weights(base_model, tmp_path):
    import copy
    m = copy.deepcopy(base_model)
    before = m.model_id
    with torch.no_grad():
        m.net.ln_f.bias.add_(0.01)
    m.weights_changed()
    assert m.model_id != before
    with pytest.raises(FileNotFoundError):
        EmbeddedUMM.from_pretrained(tmp_path / "missing")
