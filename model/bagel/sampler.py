"""BAGEL's rectified-flow Euler sampler, as pure functions over tensors (the model stays outside).

Written from the official `Bagel.generate_image` / `_forward_flow` (modeling/bagel/bagel.py):
- timesteps: `linspace(1, 0, steps)` (t = 1 is noise, 0 is data), shifted by t' = s t / (1 + (s - 1) t); the model
  is called at the first `steps - 1` of them, so `steps=50` means 49 velocity evaluations;
- Euler: x <- x - v (t - t_next), v the velocity from data to noise (the training target is noise - data);
- guidance only while interval[0] < t <= interval[1] (the shifted t); text CFG, then image CFG, then renorm
  (`global`: the norm over the whole image, `channel`: per token over channels, `text_channel`: per token, on the
  text-guided velocity only, before image CFG). As official, image CFG is applied only inside the text-CFG branch:
  a sample whose text scale is <= 1 gets its conditional velocity unguided, whatever the image scale.

Differences, on purpose: a batch of images (B, tokens, channels) with one text scale per sample (the official
code samples one image at a time, and its `global` norm spans the whole packed batch: per image here, the same for
its batch of one); velocities are cast to the latent's dtype before guidance.

diffusers' `FlowMatchEulerDiscreteScheduler(shift=s)` with `set_timesteps(sigmas=linspace(1, 0, steps)[:-1])` computes
the same shifted schedule (plus its terminal 0) and the same Euler update: the tests cross-check against it rather
than sampling through it, since it keeps a step index as state and knows no CFG.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from pydantic import Field, model_validator

from configs.loader import FloatPair, Strict
from model.registry import to_device

RenormType = Literal["global", "channel", "text_channel"]


class FlowSampling(Strict):
    """How BAGEL draws an image. Defaults are the official inferencer's text-to-image settings (50 steps, shift 3,
    CFG interval (0.4, 1], global renorm with minimum 0, no image CFG); the text CFG scale comes per sample from the
    caller (`cfg_scales`). UniCorn's rollout: shift 3, 50 steps, interval (0, 1], 1024 px."""

    steps: int = Field(50, ge=2, le=1000)  # points of the schedule; steps - 1 model evaluations
    timestep_shift: float = Field(3.0, gt=0, le=100)
    cfg_img_scale: float = Field(1.0, ge=1.0, le=20)  # 1 = off; > 1 for edits (reflection), official edit 2.0
    cfg_interval: FloatPair = (0.4, 1.0)
    cfg_renorm_type: RenormType = "global"
    cfg_renorm_min: float = Field(0.0, ge=0, le=1)  # 1 turns renorm off
    resolution: int = Field(1024, ge=16, le=4096)  # image side in pixels: 16 px per latent token

    @model_validator(mode="after")
    def _check(self) -> FlowSampling:
        lo, hi = self.cfg_interval
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"cfg_interval {self.cfg_interval}: need 0 <= start < end <= 1")
        if self.resolution % 16:
            raise ValueError(f"resolution {self.resolution} is not a multiple of 16 (8x VAE stride, 2x2 packing)")
        return self


class CfgActive(NamedTuple):
    """Which unconditional passes a step needs: `text` (B,) bool per sample, `img` for the whole batch. A velocity
    function may return None for a branch nobody needs (the official code skips those forwards)."""

    text: torch.Tensor
    img: bool


VelocityFn = Callable[[torch.Tensor, torch.Tensor, CfgActive],
                      tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def shifted_timesteps(steps: int, shift: float, device: torch.device | str | None = None) -> torch.Tensor:
    """(steps,) float32: linspace(1, 0, steps) shifted by t' = s t / (1 + (s - 1) t), ends included."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (one Euler step needs two points), got {steps}")
    t = torch.linspace(1, 0, steps, device=device)
    return shift * t / (1 + (shift - 1) * t)


def euler_step(x: torch.Tensor, v: torch.Tensor, t, t_next) -> torch.Tensor:
    """One Euler step from t down to t_next: x - v (t - t_next)."""
    return x - v * (t - t_next)


def _inside(t, interval: tuple[float, float]) -> bool:
    # compared in float32 like the official `t > lo and t <= hi` on its float32 schedule
    t = torch.as_tensor(t, dtype=torch.float32)
    return bool((t > interval[0]) & (t <= interval[1]))


def _per_sample(v: torch.Tensor, scale) -> torch.Tensor:
    """The text scales (B,) on the host: which samples are guided is known there, without waiting on the GPU."""
    s = torch.as_tensor(scale, dtype=torch.float32).cpu().reshape(-1)
    if s.numel() == 1:
        s = s.expand(v.shape[0])
    if s.numel() != v.shape[0]:
        raise ValueError(f"{s.numel()} text scales for a batch of {v.shape[0]}")
    return s


def guide(v_cond: torch.Tensor, v_text_uncond: torch.Tensor | None, v_img_uncond: torch.Tensor | None, t,
          text_scale, img_scale: float, interval: tuple[float, float], renorm_type: RenormType,
          renorm_min: float) -> torch.Tensor:
    """The guided velocity, as the official `_forward_flow`. Velocities are (B, ..., C) with channels last;
    `text_scale` is a float or one per sample. Outside the interval, or for samples with text scale <= 1, the
    conditional velocity is returned unchanged."""
    if renorm_type not in ("global", "channel", "text_channel"):
        raise ValueError(f"cfg_renorm_type {renorm_type!r}: expected global, channel or text_channel")
    if not _inside(t, interval):
        return v_cond  # official: both scales set to 1 outside the interval
    s_host = _per_sample(v_cond, text_scale)
    if not bool((s_host > 1.0).any()):
        return v_cond
    s = to_device(s_host, v_cond.device).to(v_cond.dtype)
    active = s > 1.0
    if v_text_uncond is None:
        raise ValueError("text CFG is active but no text-unconditional velocity was given")
    use_img = img_scale > 1.0
    if use_img and v_img_uncond is None:
        raise ValueError("image CFG is active but no image-unconditional velocity was given")
    shape = (-1,) + (1,) * (v_cond.ndim - 1)
    v_text = v_text_uncond + s.view(shape) * (v_cond - v_text_uncond)
    if renorm_type == "text_channel":
        ratio = v_cond.norm(dim=-1, keepdim=True) / (v_text.norm(dim=-1, keepdim=True) + 1e-8)
        v_text = v_text * ratio.clamp(min=renorm_min, max=1.0)
        out = v_img_uncond + img_scale * (v_text - v_img_uncond) if use_img else v_text
    else:
        out = v_img_uncond + img_scale * (v_text - v_img_uncond) if use_img else v_text
        if renorm_type == "global":
            n_cond = v_cond.flatten(1).norm(dim=1).view(shape)
            n_out = out.flatten(1).norm(dim=1).view(shape)
        else:
            n_cond = v_cond.norm(dim=-1, keepdim=True)
            n_out = out.norm(dim=-1, keepdim=True)
        out = out * (n_cond / (n_out + 1e-8)).clamp(min=renorm_min, max=1.0)
    return torch.where(active.view(shape), out, v_cond)


def _as(v: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if v is None else v.to(x.dtype)


def sample(velocity_fn: VelocityFn, noise: torch.Tensor, sampling: FlowSampling, text_scales) -> torch.Tensor:
    """Integrate from `noise` (B, tokens, C) at t = 1 to the latent tokens at t = 0; deterministic given the noise.

    `velocity_fn(x, t, active)` gets the current tokens, t as a (B,) float32 tensor (the shifted timestep the time
    embedder takes) and a `CfgActive`; it returns (v_cond, v_text_uncond, v_img_uncond), the unconditional ones may
    be None where `active` does not ask for them. `text_scales`: the text CFG scale per sample (<= 1: off)."""
    b = noise.shape[0]
    # the schedule and the scales on the host: whether a step guides, and whom, is decided there, so the loop never
    # waits on the GPU (a device tensor read back per step would stop the host from queuing ahead)
    scales = torch.as_tensor(text_scales, dtype=torch.float32).cpu().reshape(-1)
    if scales.numel() != b:
        raise ValueError(f"{scales.numel()} text scales for a batch of {b}")
    host_ts = shifted_timesteps(sampling.steps, sampling.timestep_shift)
    ts = to_device(host_ts, noise.device)
    x = noise
    for i in range(sampling.steps - 1):
        t, t_next = ts[i], ts[i + 1]
        inside = _inside(host_ts[i], sampling.cfg_interval)
        text_on = (scales > 1.0) & inside
        active = CfgActive(text=text_on, img=bool(text_on.any()) and sampling.cfg_img_scale > 1.0)
        v_cond, v_text, v_img = velocity_fn(x, t.expand(b), active)
        v = guide(_as(v_cond, x), _as(v_text, x), _as(v_img, x), host_ts[i], scales, sampling.cfg_img_scale,
                  sampling.cfg_interval, sampling.cfg_renorm_type, sampling.cfg_renorm_min)
        x = euler_step(x, v, t, t_next)
    return x
