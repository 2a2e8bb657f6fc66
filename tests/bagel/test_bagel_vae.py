"""BAGEL's FLUX autoencoder in diffusers: checkpoint names both ways, strict loading, encode/decode, 2x2 packing."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from model.bagel.vae import (FLUX_VAE_CONFIG, TINY_VAE_CONFIG, build_vae, decode, diffusers_to_flux, encode,
                             flux_to_diffusers, load_ae, pack_latents, save_ae, unpack_latents)


def flux_shapes(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z=16, in_ch=3, out_ch=3) -> dict[str, tuple]:
    """Names and shapes of FLUX's `AutoEncoder` (official modeling/autoencoder.py), listed from its module structure
    here rather than derived from diffusers, so the conversion is checked against an independent reference."""
    shapes: dict[str, tuple] = {}

    def conv(name, o, i, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, i, o):
        norm(f"{name}.norm1", i), conv(f"{name}.conv1", o, i, 3), norm(f"{name}.norm2", o), conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.nin_shortcut", o, i, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{n}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    levels = len(ch_mult)
    conv("encoder.conv_in", ch, in_ch, 3)
    block_in = ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 2 * z, block_in, 3)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", block_in, z, 3)
    mid("decoder", block_in)
    for i in reversed(range(levels)):  # built from the lowest resolution, stored as up[i] by level
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", out_ch, block_in, 3)
    return shapes


def meta_sd(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def shapes_of(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


TINY_FLUX = dict(ch=8, ch_mult=(1, 2, 4, 4))  # TINY_VAE_CONFIG's widths 8, 16, 32, 32 in FLUX's terms


def test_full_size_flux_names_convert_to_diffusers_exactly():
    flux = flux_shapes()
    # by hand: encoder 106 tensors (2 shortcuts), decoder 138 (2 shortcuts): ae.safetensors holds 244
    assert len(flux) == 244
    assert "encoder.mid.attn_1.q.weight" in flux and "decoder.up.3.upsample.conv.weight" in flux
    converted = shapes_of(flux_to_diffusers(meta_sd(flux)))
    expected = shapes_of(build_vae(FLUX_VAE_CONFIG, device="meta").state_dict())
    assert set(converted) - set(expected) == set()  # nothing unexpected
    assert set(expected) - set(converted) == set()  # nothing missing
    assert converted == expected
    # the decoder's level order is reversed: FLUX up.3 (lowest resolution, 512 wide) runs first in diffusers
    assert converted["decoder.up_blocks.0.resnets.0.conv1.weight"] == flux["decoder.up.3.block.0.conv1.weight"]
    assert converted["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"] == (128, 256, 1, 1)
    assert converted["encoder.mid_block.attentions.0.to_q.weight"] == (512, 512)  # 1x1 conv -> linear


def test_conversion_agrees_with_diffusers_own_ldm_vae_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    g = torch.Generator().manual_seed(0)
    flux = {k: torch.randn(s, generator=g) for k, s in flux_shapes(**TINY_FLUX).items()}
    theirs = convert_ldm_vae_checkpoint(dict(flux), TINY_VAE_CONFIG)
    ours = flux_to_diffusers(flux)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_conversion_round_trips_exactly():
    g = torch.Generator().manual_seed(1)
    flux = {k: torch.randn(s, generator=g) for k, s in flux_shapes(**TINY_FLUX).items()}
    back = diffusers_to_flux(flux_to_diffusers(flux))
    assert back.keys() == flux.keys()
    assert all(torch.equal(back[k], flux[k]) and back[k].shape == flux[k].shape for k in flux)
    torch.manual_seed(2)
    sd = build_vae(TINY_VAE_CONFIG).state_dict()
    again = flux_to_diffusers(diffusers_to_flux(sd))
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    # full size, names and shapes only
    full = shapes_of(build_vae(FLUX_VAE_CONFIG, device="meta").state_dict())
    assert shapes_of(diffusers_to_flux(meta_sd(full))) == flux_shapes()


def test_file_round_trip_in_flux_names(tmp_path):
    torch.manual_seed(3)
    vae = build_vae(TINY_VAE_CONFIG)
    path = tmp_path / "ae.safetensors"
    save_ae(vae, path)
    on_disk = load_file(str(path))
    assert shapes_of(on_disk) == flux_shapes(**TINY_FLUX)  # exactly FLUX's names: the official loader finds all
    loaded = load_ae(path, TINY_VAE_CONFIG)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ref, got = vae.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert load_ae(path, TINY_VAE_CONFIG, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_load_is_strict_with_one_clear_error(tmp_path):
    flux = {k: torch.zeros(s) for k, s in flux_shapes(**TINY_FLUX).items()}
    cases = {
        "missing": {k: v for k, v in flux.items() if k != "decoder.conv_out.bias"},
        "unexpected": {**flux, "quant_conv.weight": torch.zeros(32, 32, 1, 1)},
        "misshapen": {**flux, "encoder.conv_in.bias": torch.zeros(9)},
    }
    for what, sd in cases.items():
        path = tmp_path / f"{what}.safetensors"
        save_file(sd, str(path))
        with pytest.raises(ValueError, match=what) as err:
            load_ae(path, TINY_VAE_CONFIG)
        assert {"missing": "decoder.conv_out.bias", "unexpected": "quant_conv.weight",
                "misshapen": "encoder.conv_in.bias"}[what] in str(err.value)
    # a wider file does not fit the tiny config: every tensor misshapen, five named and the rest counted
    save_file({k: torch.zeros(s) for k, s in flux_shapes(ch=32).items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"misshapen: .*\(\+\d+ more\)"):
        load_ae(tmp_path / "wide.safetensors", TINY_VAE_CONFIG)
    with pytest.raises(ValueError, match="safetensors"):
        load_ae(tmp_path / "ae.pt", TINY_VAE_CONFIG)


def images(n=2, w=48, h=32):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def test_tiny_encode_decode_shapes_and_normalisation():
    torch.manual_seed(4)
    vae = build_vae(TINY_VAE_CONFIG).eval()
    ims = images()
    z = encode(vae, ims, sample=False)
    assert z.shape == (2, 16, 4, 6)  # H/8, W/8
    x = torch.from_numpy(np.stack([np.asarray(im) for im in ims])).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mode()
    assert torch.allclose(z, (mean - 0.1159) * 0.3611, atol=1e-6)  # BAGEL's scale * (z - shift)
    # sampling (the official default) is reproducible with a generator and differs from the mean
    z1 = encode(vae, ims, generator=torch.Generator().manual_seed(0))
    z2 = encode(vae, ims, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z1, z2) and not torch.equal(z1, z)
    out = decode(vae, z)
    assert [im.size for im in out] == [(48, 32), (48, 32)] and out[0].mode == "RGB"
    with pytest.raises(ValueError, match="multiples of 8"):
        encode(vae, images(w=44))
    with pytest.raises(ValueError, match="one size"):
        encode(vae, images(1) + images(1, w=56))


def test_pack_order_by_hand():
    # latent[c, y, x] = 100 c + 10 y + x, C = 2, 4 x 4, p = 2: tokens row-major over the 2 x 2 grid, features
    # (row in patch, column in patch, channel): token 0 = (y, x) in {0, 1}^2 for c = 0, 1
    c, y, x = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    lat = (100 * c + 10 * y + x).float()[None]
    tokens = pack_latents(lat)
    assert tokens.shape == (1, 4, 8)
    assert tokens[0].tolist() == [
        [0, 100, 1, 101, 10, 110, 11, 111],   # grid (0, 0)
        [2, 102, 3, 103, 12, 112, 13, 113],   # grid (0, 1): x + 2
        [20, 120, 21, 121, 30, 130, 31, 131],  # grid (1, 0): y + 2
        [22, 122, 23, 123, 32, 132, 33, 133],  # grid (1, 1)
    ]
    assert torch.equal(unpack_latents(tokens, 2, 2), lat)


def test_pack_matches_the_official_formula_and_round_trips():
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(3, 16, 8, 12, generator=g)
    p, h, w = 2, 4, 6
    tokens = pack_latents(lat)
    assert tokens.shape == (3, h * w, 64)
    for b in range(3):  # bagel.py, one image at a time
        official = torch.einsum("chpwq->hwpqc", lat[b].reshape(16, h, p, w, p)).reshape(-1, p * p * 16)
        assert torch.equal(tokens[b], official)
    # inferencer.decode_image's inverse
    official_un = torch.einsum("nhwpqc->nchpwq", tokens.reshape(3, h, w, p, p, 16)).reshape(3, 16, h * p, w * p)
    assert torch.equal(unpack_latents(tokens, h, w), official_un)
    assert torch.equal(unpack_latents(tokens, h, w), lat)
    with pytest.raises(ValueError):
        pack_latents(torch.zeros(1, 16, 5, 4))
    with pytest.raises(ValueError):
        unpack_latents(tokens, 5, 5)
