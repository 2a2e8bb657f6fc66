"""BAGEL's image autoencoder: FLUX.1's VAE run by diffusers' `AutoencoderKL`, and BAGEL's 2x2 latent packing.

BAGEL ships the FLUX autoencoder as `ae.safetensors` in FLUX's original parameter names (its
`modeling/autoencoder.py`). We run it with diffusers' `AutoencoderKL` built from an explicit config (no download)
and convert names both ways, so a downloaded checkpoint loads here and a child we save loads in the official code.

Numerics follow the official code: pixels in [-1, 1] (`Normalize(0.5, 0.5)`), latents `scale * (z - shift)`, and
encoding *samples* the posterior (the official `DiagonalGaussian` defaults to `sample=True`, used for training
targets and for the reference image of an edit); `sample=False` takes the mean. diffusers clamps the log-variance to
[-30, 20] before sampling, the official code does not: a difference only for a degenerate encoder.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# diffusers' own config for FLUX.1's VAE (black-forest-labs/FLUX.1-*/vae/config.json): the official
# AutoEncoderParams (ch 128, ch_mult 1,2,4,4, 2 res blocks, z 16) in diffusers' terms. FLUX has no quant convs.
FLUX_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

# The same structure (4 levels so the stride stays 8, 2 res blocks, channel changes that need shortcut convs,
# mid-block attention, 16 latent channels) at toy widths, for CPU tests. Not loadable by the official code, which
# fixes GroupNorm at 32 groups.
TINY_VAE_CONFIG: dict = {
    **FLUX_VAE_CONFIG,
    "block_out_channels": [8, 16, 32, 32],
    "norm_num_groups": 4,
    "sample_size": 64,
}

# leaf module names: FLUX -> diffusers
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_INV = {v: k for k, v in _RESNET.items()}
_ATTN_INV = {v: k for k, v in _ATTN.items()}
_ATTN_LINEAR = ("to_q", "to_k", "to_v", "to_out.0")  # FLUX: 1x1 convs; diffusers: linears


def _levels(keys, pattern: str) -> int:
    """Number of resolution levels, read from the decoder's block indices (the only ones that get reversed)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _flux_to_diffusers_name(key: str, levels: int) -> str | None:
    m = re.fullmatch(r"(encoder|decoder)\.(.+)\.(weight|bias)", key)
    if not m:
        return None
    part, body, leaf = m.groups()
    new = None
    if body in ("conv_in", "conv_out"):
        new = body
    elif body == "norm_out":
        new = "conv_norm_out"
    elif (r := re.fullmatch(r"mid\.block_([12])\.(\w+)", body)) and r[2] in _RESNET:
        new = f"mid_block.resnets.{int(r[1]) - 1}.{_RESNET[r[2]]}"
    elif (r := re.fullmatch(r"mid\.attn_1\.(\w+)", body)) and r[1] in _ATTN:
        new = f"mid_block.attentions.0.{_ATTN[r[1]]}"
    elif part == "encoder" and (r := re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(\w+)", body)) and r[3] in _RESNET:
        new = f"down_blocks.{r[1]}.resnets.{r[2]}.{_RESNET[r[3]]}"
    elif part == "encoder" and (r := re.fullmatch(r"down\.(\d+)\.downsample\.conv", body)):
        new = f"down_blocks.{r[1]}.downsamplers.0.conv"
    # FLUX's decoder stores `up` by resolution level (0 = full size, run last); diffusers by execution order
    elif part == "decoder" and (r := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(\w+)", body)) and r[3] in _RESNET:
        new = f"up_blocks.{levels - 1 - int(r[1])}.resnets.{r[2]}.{_RESNET[r[3]]}"
    elif part == "decoder" and (r := re.fullmatch(r"up\.(\d+)\.upsample\.conv", body)):
        new = f"up_blocks.{levels - 1 - int(r[1])}.upsamplers.0.conv"
    return None if new is None else f"{part}.{new}.{leaf}"


def _diffusers_to_flux_name(key: str, levels: int) -> str | None:
    m = re.fullmatch(r"(encoder|decoder)\.(.+)\.(weight|bias)", key)
    if not m:
        return None
    part, body, leaf = m.groups()
    new = None
    if body in ("conv_in", "conv_out"):
        new = body
    elif body == "conv_norm_out":
        new = "norm_out"
    elif (r := re.fullmatch(r"mid_block\.resnets\.([01])\.(\w+)", body)) and r[2] in _RESNET_INV:
        new = f"mid.block_{int(r[1]) + 1}.{_RESNET_INV[r[2]]}"
    elif (r := re.fullmatch(r"mid_block\.attentions\.0\.(\w+(?:\.0)?)", body)) and r[1] in _ATTN_INV:
        new = f"mid.attn_1.{_ATTN_INV[r[1]]}"
    elif part == "encoder" and (r := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", body)) \
            and r[3] in _RESNET_INV:
        new = f"down.{r[1]}.block.{r[2]}.{_RESNET_INV[r[3]]}"
    elif part == "encoder" and (r := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", body)):
        new = f"down.{r[1]}.downsample.conv"
    elif part == "decoder" and (r := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", body)) \
            and r[3] in _RESNET_INV:
        new = f"up.{levels - 1 - int(r[1])}.block.{r[2]}.{_RESNET_INV[r[3]]}"
    elif part == "decoder" and (r := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", body)):
        new = f"up.{levels - 1 - int(r[1])}.upsample.conv"
    return None if new is None else f"{part}.{new}.{leaf}"


def _put(out: dict, key: str, value, source: str) -> None:
    if key in out:
        raise ValueError(f"two parameters map to {key!r} (the second from {source!r})")
    out[key] = value


def flux_to_diffusers(sd: dict[str, torch.Tensor], levels: int | None = None) -> dict[str, torch.Tensor]:
    """FLUX's original VAE names (`encoder.down.0.block.0.norm1.weight`, `decoder.up.3.upsample.conv.weight`,
    `encoder.mid.attn_1.q.weight`, ...) -> diffusers' `AutoencoderKL` names. Attention 1x1 conv weights become linear
    weights. Keys that are not FLUX VAE parameters pass through unchanged, so a strict load reports them.
    `levels` (resolution levels) is read from the decoder's `up.N` indices unless given."""
    levels = _levels(sd, r"decoder\.up\.(\d+)\.") if levels is None else levels
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _flux_to_diffusers_name(key, levels)
        if new is None:
            _put(out, key, value, key)
            continue
        if new.endswith(tuple(f"{n}.weight" for n in _ATTN_LINEAR)) and value.ndim == 4:
            value = value[:, :, 0, 0]
        _put(out, new, value, key)
    return out


def diffusers_to_flux(sd: dict[str, torch.Tensor], levels: int | None = None) -> dict[str, torch.Tensor]:
    """The inverse of `flux_to_diffusers`: diffusers' `AutoencoderKL` names -> FLUX's, attention linear weights
    back to 1x1 convs, so the official `AutoEncoder.load_state_dict` finds every key with its shape."""
    levels = _levels(sd, r"decoder\.up_blocks\.(\d+)\.") if levels is None else levels
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _diffusers_to_flux_name(key, levels)
        if new is None:
            _put(out, key, value, key)
            continue
        if re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key) and value.ndim == 2:
            value = value[:, :, None, None]
        _put(out, new, value, key)
    return out


def build_vae(config: dict = FLUX_VAE_CONFIG, device: str | torch.device | None = None):
    """A randomly initialised `AutoencoderKL` of this config (`device="meta"`: shapes only, no memory)."""
    from diffusers import AutoencoderKL

    with torch.device(device or "cpu"):
        return AutoencoderKL(**config)


def load_ae(path: str | Path, config: dict = FLUX_VAE_CONFIG, *, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None):
    """An `ae.safetensors` in FLUX's names -> diffusers' `AutoencoderKL` (eval mode). Strict: a missing, unexpected
    or misshapen parameter is one ValueError naming a few of them."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":  # pickled checkpoints run code on load
        raise ValueError(f"{path}: only .safetensors autoencoder files are loaded")
    sd = flux_to_diffusers(load_file(str(path), device=str(device)), levels=len(config["block_out_channels"]))
    vae = build_vae(config, device="meta")
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshapen = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or misshapen:
        def few(names):
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        problems = [f"{len(names)} {what}: {few(names)}" for what, names in
                    (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if names]
        raise ValueError(f"{path} does not fit this autoencoder config: " + "; ".join(problems))
    if dtype is not None:  # cast the tensors, not the module: diffusers warns on `AutoencoderKL.to(dtype)`
        sd = {k: v.to(dtype) for k, v in sd.items()}
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def save_ae(vae, path: str | Path) -> None:
    """Write `vae`'s weights as `ae.safetensors` in FLUX's names (the file the official `load_ae` reads)."""
    from safetensors.torch import save_file

    levels = len(vae.config.block_out_channels)
    sd = diffusers_to_flux({k: v.detach() for k, v in vae.state_dict().items()}, levels=levels)
    save_file({k: v.cpu().contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Same-size PIL images -> (B, 3, H, W) float32 in [-1, 1], as the official ToTensor + Normalize(0.5, 0.5)."""
    if not images:
        raise ValueError("no images")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images must share one size to batch; got {sorted(sizes)}")
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255)
    return (x - 0.5) / 0.5


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL, truncating to uint8 as the official `decode_image` does (no rounding)."""
    x = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in x]


@torch.no_grad()
def posterior(vae, images: list[Image.Image]) -> torch.Tensor:
    """Images (same size, sides multiples of 8) -> the encoder's posterior (B, 2 x 16, H/8, W/8): means, then
    log-variances (diffusers' `DiagonalGaussianDistribution` parameters)."""
    w, h = images[0].size if images else (0, 0)
    if h % 8 or w % 8:
        raise ValueError(f"image sides must be multiples of 8, got {w}x{h}")
    p = next(vae.parameters())
    return vae.encode(pil_to_tensor(images).to(p.device, p.dtype)).latent_dist.parameters


@torch.no_grad()
def sample_posterior(vae, params: torch.Tensor, *, sample: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """A posterior (`posterior`) -> normalised latents (B, 16, H/8, W/8) = scale * (z - shift). `sample=True`
    draws from it as the official encoder does; `generator` makes it reproducible."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    dist = DiagonalGaussianDistribution(params)
    z = dist.sample(generator=generator) if sample else dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def encode(vae, images: list[Image.Image], *, sample: bool = True,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (same size, sides multiples of 8) -> normalised latents (B, 16, H/8, W/8) = scale * (z - shift)."""
    return sample_posterior(vae, posterior(vae, images), sample=sample, generator=generator)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> list[Image.Image]:
    """Normalised latents (B, 16, h, w) -> PIL images (8h x 8w): z = latents / scale + shift, then the decoder."""
    p = next(vae.parameters())
    z = latents.to(p.device, p.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return tensor_to_pil(vae.decode(z, return_dict=False)[0])


def pack_latents(latents: torch.Tensor, p: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C) tokens in the official order: tokens row-major over the (H/p, W/p)
    grid, features ordered (row in patch, column in patch, channel), i.e. bagel.py's
    `latent.reshape(C, h, p, w, p)` then `einsum("chpwq->hwpqc")` - the order `vae2llm` / `llm2vae` weights expect."""
    b, c, hh, ww = latents.shape
    if hh % p or ww % p:
        raise ValueError(f"latent size {hh}x{ww} is not a multiple of the patch size {p}")
    h, w = hh // p, ww // p
    x = latents.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # b h w p q c
    return x.reshape(b, h * w, p * p * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int, p: int = 2) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); `h`, `w` are the token grid (latent side / p, image side / 16), as in
    the official `decode_image` (`reshape(1, h, w, p, p, C)`, `einsum("nhwpqc->nchpwq")`)."""
    b, n, d = tokens.shape
    if n != h * w or d % (p * p):
        raise ValueError(f"{n} tokens of width {d} do not make a {h}x{w} grid of {p}x{p} patches")
    c = d // (p * p)
    x = tokens.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # b c h p w q
    return x.reshape(b, c, h * p, w * p)
