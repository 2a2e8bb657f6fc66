"""BAGEL's network: the official checkpoint's layout, the Mixture-of-Transformers property, the official config
files."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from model.bagel.config import (
    BAGEL_7B_MOT,
    LLM_CONFIG,
    NET_CONFIG,
    TINY,
    VIT_CONFIG,
    BagelConfig,
)
from model.bagel.modeling import BagelNet

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "fixtures" / "bagel_7b_mot_params.json"


def _fixture_script():
    """scripts/bagel_param_fixture.py, which derived the fixture from the official code (its config dicts only)."""
    spec = importlib.util.spec_from_file_location("bagel_param_fixture", ROOT / "scripts" / "bagel_param_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- (a) the official layout


def test_7b_state_dict_equals_official_checkpoint_layout():
    with torch.device("meta"):
        net = BagelNet(BAGEL_7B_MOT)
    ours = {name: list(t.shape) for name, t in net.state_dict().items()}
    official = json.loads(FIXTURE.read_text())
    assert sorted(set(official) - set(ours)) == [], "names the official checkpoint has and we lack"
    assert sorted(set(ours) - set(official)) == [], "names we have and the official checkpoint lacks"
    assert {k: v for k, v in ours.items() if v != official[k]} == {}
    assert all(t.is_meta for t in net.state_dict().values())


def test_fixture_was_built_from_the_same_configs():
    script = _fixture_script()
    assert BAGEL_7B_MOT.llm_json() == script.LLM_JSON
    assert BAGEL_7B_MOT.vit_json() == script.VIT_JSON


# ---------------------------------------------------------------- (b) Mixture-of-Transformers on CPU


def _sequence(net: BagelNet, seed: int = 0):
    """text(6) | <img> latents(6) </img> at one RoPE position | text(4), und tokens never attending gen tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY.llm.vocab_size, (6 + 2 + 4,), generator=g)
    text = net.embed_text(ids)
    packed = torch.randn(6, TINY.patch_latent_dim, generator=g)
    lat = net.embed_latents(packed, 0.6, net.latent_position_ids(2, 3))
    embeds = torch.cat([text[:7], lat, text[7:]])
    L = embeds.shape[0]
    pos = torch.tensor([0, 1, 2, 3, 4, 5] + [6] * 8 + [7, 8, 9, 10])
    gen = torch.zeros(L, dtype=torch.bool)
    gen[7:13] = True
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool))
    mask[6:14, 6:14] = True  # an image's tokens attend to each other
    mask[~gen] &= ~gen  # no understanding token sees a generation token
    return embeds, pos, gen, mask


def _gen_params(net):
    return [p for n, p in net.language_model.named_parameters() if "moe_gen" in n]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = BagelNet(TINY).eval()
    with torch.no_grad():  # norms away from 1, so changing either set of weights shows
        for n, p in net.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return net


@torch.no_grad()
def test_gen_weights_change_only_gen_tokens(tiny):
    embeds, pos, gen, mask = _sequence(tiny)
    before = tiny.forward_packed(embeds, pos, gen, mask)
    assert before.shape == embeds.shape and torch.isfinite(before).all()
    saved = [p.clone() for p in _gen_params(tiny)]
    try:
        for p in _gen_params(tiny):
            p.add_(0.5 * torch.randn_like(p))
        after = tiny.forward_packed(embeds, pos, gen, mask)
    finally:
        for p, s in zip(_gen_params(tiny), saved):
            p.copy_(s)
    torch.testing.assert_close(after[~gen], before[~gen], rtol=0, atol=1e-6)
    assert (after[gen] - before[gen]).abs().amax(dim=1).min() > 1e-3  # every gen token moved


@torch.no_grad()
def test_und_weights_reach_gen_tokens_through_shared_attention(tiny):
    embeds, pos, gen, mask = _sequence(tiny)
    before = tiny.forward_packed(embeds, pos, gen, mask)
    w = tiny.language_model.model.layers[0].self_attn.v_proj.weight
    saved = w.clone()
    try:
        w.add_(0.5 * torch.randn_like(w))
        after = tiny.forward_packed(embeds, pos, gen, mask)
    finally:
        w.copy_(saved)
    assert (after[gen] - before[gen]).abs().max() > 1e-3


@torch.no_grad()
def test_gen_weights_equal_to_und_weights_make_one_dense_transformer():
    torch.manual_seed(1)
    net = BagelNet(TINY).eval()
    sd = net.language_model.state_dict()
    net.language_model.load_state_dict({k: sd[k.replace("_moe_gen", "")] for k in sd})  # the official init_moe
    embeds, pos, gen, mask = _sequence(net)
    torch.testing.assert_close(net.forward_packed(embeds, pos, gen, mask),
                               net.forward_packed(embeds, pos, torch.zeros_like(gen), mask))


@torch.no_grad()
def test_kv_cache_equals_one_pass(tiny):
    embeds, pos, gen, mask = _sequence(tiny)
    full = tiny.forward_packed(embeds, pos, gen, mask)
    P = 6
    _, kv = tiny.forward_packed(embeds[:P], pos[:P], gen[:P], mask[:P, :P], return_kv=True)
    rest = tiny.forward_packed(embeds[P:], pos[P:], gen[P:], mask[P:], past_kv=kv)
    torch.testing.assert_close(rest, full[P:])


@torch.no_grad()
def test_embeddings_and_heads_shapes(tiny):
    from PIL import Image

    image = Image.new("RGB", (150, 90), (200, 30, 60))
    pixels, pos_ids, (rows, cols) = tiny.vit_patchify(image)
    assert pixels.shape == (rows * cols, 3 * 14 * 14) and rows * 14 <= 112 and cols * 14 <= 112
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(pos_ids, tiny.vit_position_ids(rows, cols))
    assert tiny.embed_vit(pixels, pos_ids).shape == (rows * cols, TINY.llm.hidden_size)
    lat = tiny.embed_latents(torch.randn(6, 64), torch.full((6,), 0.5), tiny.latent_position_ids(2, 3))
    assert lat.shape == (6, TINY.llm.hidden_size)
    assert tiny.latent_position_ids(2, 3).tolist() == [0, 1, 2, 8, 9, 10]
    h = torch.randn(5, TINY.llm.hidden_size)
    assert tiny.lm_logits(h).shape == (5, TINY.llm.vocab_size)
    assert tiny.velocity(h).shape == (5, TINY.patch_latent_dim)


def test_backward_through_both_expert_sets():
    torch.manual_seed(2)
    net = BagelNet(TINY)
    assert net.llm2vae.weight.abs().sum() == 0  # a fresh head predicts zero velocity, as the official init
    torch.nn.init.normal_(net.llm2vae.weight, std=0.02)  # else no gradient reaches the generation weights
    embeds, pos, gen, mask = _sequence(net)
    hidden = net.forward_packed(embeds.detach(), pos, gen, mask)
    (net.lm_logits(hidden[~gen]).logsumexp(-1).sum() + net.velocity(hidden[gen]).pow(2).sum()).backward()
    layer = net.language_model.model.layers[0]
    assert layer.mlp.up_proj.weight.grad.abs().sum() > 0
    assert layer.mlp_moe_gen.up_proj.weight.grad.abs().sum() > 0
    assert net.vit_pos_embed.pos_embed.grad is None  # the sin-cos tables stay frozen


# ---------------------------------------------------------------- (c) the official config files


@pytest.mark.parametrize("cfg", [TINY, BAGEL_7B_MOT], ids=["tiny", "7b"])
def test_config_round_trip_through_official_files(tmp_path, cfg):
    cfg.write_official(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {LLM_CONFIG, VIT_CONFIG, NET_CONFIG}
    assert BagelConfig.from_official_dir(tmp_path) == cfg


def test_official_files_alone_read_as_bagel_7b(tmp_path):
    """A downloaded checkpoint has only the two files: the rest is the official scripts' values."""
    script = _fixture_script()
    (tmp_path / LLM_CONFIG).write_text(json.dumps(script.LLM_JSON))
    (tmp_path / VIT_CONFIG).write_text(json.dumps(script.VIT_JSON))
    cfg = BagelConfig.from_official_dir(tmp_path)
    assert cfg == BAGEL_7B_MOT
    assert cfg.llm.qk_norm and cfg.vit_layers == 26 and cfg.llm.head_dim == 128
    assert BagelConfig.from_official_dir(tmp_path, timestep_shift=3.0).timestep_shift == 3.0
    # written back, the LLM file is the published one
    cfg.write_official(tmp_path / "out")
    assert json.loads((tmp_path / "out" / LLM_CONFIG).read_text()) == script.LLM_JSON


def test_unknown_keys_ride_along(tmp_path):
    TINY.write_official(tmp_path)
    data = json.loads((tmp_path / LLM_CONFIG).read_text())
    data["rope_scaling"] = None
    (tmp_path / LLM_CONFIG).write_text(json.dumps(data))
    cfg = BagelConfig.from_official_dir(tmp_path)
    assert cfg.llm.extra["rope_scaling"] is None
    cfg.write_official(tmp_path / "again")
    assert json.loads((tmp_path / "again" / LLM_CONFIG).read_text()) == data
