"""BAGEL's rectified-flow sampler against numbers worked out by hand from the official formulas.

Formulas (official modeling/bagel/bagel.py): t' = s t / (1 + (s - 1) t) over linspace(1, 0, steps);
x <- x - v (t - t_next); guidance only for interval[0] < t <= interval[1]; v_text = u + s (c - u);
v = u_img + s_img (v_text - u_img); renorm scale = clamp(|c| / (|v| + 1e-8), min, 1).
"""

import math

import pytest
import torch
from pydantic import ValidationError

from model.bagel.sampler import CfgActive, FlowSampling, euler_step, guide, sample, shifted_timesteps


def test_shifted_timesteps_by_hand():
    # linspace(1, 0, 5) = 1, .75, .5, .25, 0; s = 3: 3t / (1 + 2t)
    # .75 -> 2.25 / 2.5 = 0.9; .5 -> 1.5 / 2 = 0.75; .25 -> .75 / 1.5 = 0.5; the ends stay 1 and 0
    assert shifted_timesteps(5, 3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-7)
    # s = 2, linspace(1, 0, 3): .5 -> 1 / 1.5 = 2/3
    assert shifted_timesteps(3, 2.0).tolist() == pytest.approx([1.0, 2 / 3, 0.0], abs=1e-7)
    # s = 1 is no shift
    assert shifted_timesteps(5, 1.0).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-7)
    # `steps` points, so steps - 1 Euler steps whose dt sum to 1
    ts = shifted_timesteps(50, 3.0)
    assert ts.shape == (50,) and ts.dtype == torch.float32
    assert float((ts[:-1] - ts[1:]).sum()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        shifted_timesteps(1, 3.0)


def test_euler_step_by_hand():
    # dt = 0.75 - 0.5 = 0.25: [1 - 0.5 * 0.25, 2 + 1 * 0.25] = [0.875, 2.25]
    x = euler_step(torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), 0.75, 0.5)
    assert x.tolist() == [0.875, 2.25]


def test_schedule_and_step_match_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, shift = 7, 3.0
    ours = shifted_timesteps(steps, shift)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, steps)[:-1].tolist())  # it shifts, then appends the final 0
    assert torch.allclose(sched.sigmas, ours, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = x_ref = torch.randn(2, 4, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 4, 8, generator=g)
        x_ref = sched.step(v, t, x_ref).prev_sample
        x = euler_step(x, v, ours[i], ours[i + 1])
    assert torch.allclose(x, x_ref, atol=1e-5)


# one image, two tokens, two channels: cond token norms 5 and 10
C = torch.tensor([[[3.0, 4.0], [6.0, 8.0]]])
U = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])  # text-unconditional
# text scale 2: U + 2 (C - U) = 2C - U = [[3, 4], [12, 16]] (token norms 5, 20)
V_TEXT = torch.tensor([[[3.0, 4.0], [12.0, 16.0]]])
UI = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # image-unconditional


def g(renorm_type="global", renorm_min=0.0, t=0.5, text_scale=2.0, img_scale=1.0, v_img=None, interval=(0.4, 1.0),
      v_cond=C, v_text=U):
    return guide(v_cond, v_text, v_img, t, text_scale, img_scale, interval, renorm_type, renorm_min)


def test_text_cfg_without_renorm():
    # renorm_min 1 clamps the scale to exactly 1: plain CFG
    for kind in ("global", "channel", "text_channel"):
        assert torch.equal(g(kind, renorm_min=1.0), V_TEXT)


def test_channel_renorm_by_hand():
    # per token: 5/5 = 1 -> [3, 4]; 10/20 = 0.5 -> [6, 8]
    assert torch.allclose(g("channel"), torch.tensor([[[3.0, 4.0], [6.0, 8.0]]]))
    # min 0.75 lifts the second token's 0.5 to 0.75: [9, 12]
    assert torch.allclose(g("channel", renorm_min=0.75), torch.tensor([[[3.0, 4.0], [9.0, 12.0]]]))
    # text_channel without image CFG is the same arithmetic
    assert torch.allclose(g("text_channel"), torch.tensor([[[3.0, 4.0], [6.0, 8.0]]]))


def test_global_renorm_by_hand():
    # |C| = sqrt(9 + 16 + 36 + 64) = sqrt(125); |V_TEXT| = sqrt(9 + 16 + 144 + 256) = sqrt(425): scale sqrt(5/17)
    out = g("global")
    assert torch.allclose(out, V_TEXT * math.sqrt(5 / 17))
    assert float(out.norm()) == pytest.approx(math.sqrt(125), rel=1e-6)
    # a ratio above 1 is clamped to 1: with U = 2C - S the guided v is S = [[0, 0], [3, 4]], |S| = 5 < sqrt(125)
    small = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])
    assert torch.equal(g("global", v_text=2 * C - small), small)


def test_global_norm_is_per_image():
    # two copies of the same image in a batch guide exactly as one does alone
    out = g("global", v_cond=torch.cat([C, C]), v_text=torch.cat([U, U]))
    assert torch.allclose(out, torch.cat([V_TEXT, V_TEXT]) * math.sqrt(5 / 17))


def test_image_cfg_by_hand():
    # text_channel: renorm the text-guided v to [[3, 4], [6, 8]], then image CFG with no renorm:
    # UI + 2 ([[3, 4], [6, 8]] - UI) = [[6 - 1, 8 - 0], [12, 16]] = [[5, 8], [12, 16]]
    out = g("text_channel", img_scale=2.0, v_img=UI)
    assert torch.allclose(out, torch.tensor([[[5.0, 8.0], [12.0, 16.0]]]))
    # channel: image CFG first, 2 V_TEXT - UI = [[5, 8], [24, 32]] (norms sqrt(89), 40), then renorm per token:
    # 5 / sqrt(89) and 10 / 40 = 0.25 -> [[5, 8] * 5 / sqrt(89), [6, 8]]
    out = g("channel", img_scale=2.0, v_img=UI)
    assert torch.allclose(out, torch.tensor([[[5.0, 8.0], [6.0, 8.0]]]) * torch.tensor([[[5 / math.sqrt(89)], [1.0]]]))
    # global: |[[5, 8], [24, 32]]|^2 = 25 + 64 + 576 + 1024 = 1689; scale sqrt(125 / 1689)
    out = g("global", img_scale=2.0, v_img=UI)
    assert torch.allclose(out, torch.tensor([[[5.0, 8.0], [24.0, 32.0]]]) * math.sqrt(125 / 1689))
    # no renorm: plain nested CFG
    assert torch.equal(g("global", renorm_min=1.0, img_scale=2.0, v_img=UI), torch.tensor([[[5.0, 8.0], [24.0, 32.0]]]))


def test_cfg_only_inside_the_interval():
    guided = g("channel")
    assert torch.equal(g("channel", t=0.3), C)   # below the interval
    assert torch.equal(g("channel", t=0.4), C)   # the start is excluded: t > 0.4
    assert torch.allclose(g("channel", t=1.0), guided)  # the end is included: t <= 1
    assert torch.allclose(g("channel", t=0.41), guided)
    assert torch.equal(g("channel", t=0.8, interval=(0.0, 0.5)), C)
    # outside, no unconditional velocity is needed at all
    assert torch.equal(guide(C, None, None, 0.2, 4.0, 2.0, (0.4, 1.0), "global", 0.0), C)


def test_scale_one_is_a_no_op():
    for kind in ("global", "channel", "text_channel"):
        assert torch.equal(g(kind, text_scale=1.0), C)
        # as official: image CFG lives inside the text-CFG branch, so text scale 1 turns both off
        assert torch.equal(g(kind, text_scale=1.0, img_scale=2.0, v_img=UI), C)
        # image scale 1 is the text-only result
        assert torch.equal(g(kind, img_scale=1.0, v_img=UI), g(kind))
    assert torch.equal(guide(C, None, None, 0.5, 1.0, 1.0, (0.0, 1.0), "global", 0.0), C)


def test_text_scale_per_sample():
    out = g("channel", v_cond=torch.cat([C, C]), v_text=torch.cat([U, U]), text_scale=torch.tensor([1.0, 2.0]))
    assert torch.equal(out[0], C[0])
    assert torch.allclose(out[1], torch.tensor([[3.0, 4.0], [6.0, 8.0]]))


def test_guide_errors():
    with pytest.raises(ValueError, match="text-unconditional"):
        guide(C, None, None, 0.5, 2.0, 1.0, (0.0, 1.0), "global", 0.0)
    with pytest.raises(ValueError, match="image-unconditional"):
        guide(C, U, None, 0.5, 2.0, 2.0, (0.0, 1.0), "global", 0.0)
    with pytest.raises(ValueError, match="renorm"):
        guide(C, U, None, 0.5, 2.0, 1.0, (0.0, 1.0), "local", 0.0)
    with pytest.raises(ValueError, match="text scales"):
        guide(C, U, None, 0.5, [2.0, 3.0], 1.0, (0.0, 1.0), "global", 0.0)


def test_sample_with_the_exact_velocity_lands_on_the_data():
    # x_t = (1 - t) x0 + t eps has velocity eps - x0 = (x_t - x0) / t, so every Euler step is exact
    g_ = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 6, 8, generator=g_), torch.randn(2, 6, 8, generator=g_)
    out = sample(lambda x, t, a: ((x - x0) / t.view(-1, 1, 1), None, None), noise, FlowSampling(steps=12), [1.0, 1.0])
    assert torch.allclose(out, x0, atol=1e-5)


def test_sample_constant_velocity_telescopes_and_is_deterministic():
    # the dt sum to 1: x_final = noise - v
    noise = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(2))
    v = torch.full_like(noise, 0.25)
    out = sample(lambda x, t, a: (v, None, None), noise, FlowSampling(steps=5), [1.0])
    assert torch.allclose(out, noise - v, atol=1e-6)
    assert torch.equal(out, sample(lambda x, t, a: (v, None, None), noise, FlowSampling(steps=5), [1.0]))


def test_sample_asks_for_cfg_only_inside_the_interval():
    # steps 5, shift 3: evaluated at t = 1, 0.9, 0.75, 0.5 (never at 0); interval (0.6, 1] holds the first three
    calls = []

    def fn(x, t, active: CfgActive):
        calls.append((round(float(t[0]), 6), active.text.tolist(), active.img))
        c = torch.ones_like(x)
        return c, (torch.zeros_like(x) if active.text.any() else None), (torch.zeros_like(x) if active.img else None)

    s = FlowSampling(steps=5, cfg_interval=(0.6, 1.0), cfg_img_scale=1.5, cfg_renorm_min=1.0)
    out = sample(fn, torch.zeros(2, 3, 4), s, [3.0, 1.0])
    assert calls == [(1.0, [True, False], True), (0.9, [True, False], True), (0.75, [True, False], True),
                     (0.5, [False, False], False)]
    # sample 0: guided v = 1.5 * (0 + 3 (1 - 0) - 0) = 4.5 for dt 0.1 + 0.15 + 0.25 = 0.5, then v = 1 for dt 0.5:
    # x = -(4.5 * 0.5 + 1 * 0.5) = -2.75; sample 1 (scale 1): -(1 * 1) = -1
    assert torch.allclose(out[0], torch.full((3, 4), -2.75))
    assert torch.allclose(out[1], torch.full((3, 4), -1.0))


def test_sample_checks_the_batch():
    with pytest.raises(ValueError, match="text scales"):
        sample(lambda x, t, a: (x, None, None), torch.zeros(2, 3, 4), FlowSampling(steps=3), [1.0])


def test_flow_sampling_defaults_and_validation():
    s = FlowSampling()
    assert (s.steps, s.timestep_shift, s.cfg_img_scale, s.cfg_interval, s.cfg_renorm_type, s.cfg_renorm_min,
            s.resolution) == (50, 3.0, 1.0, (0.4, 1.0), "global", 0.0, 1024)
    assert FlowSampling(cfg_interval=[0, 1], timestep_shift=3).cfg_interval == (0.0, 1.0)  # YAML lists, ints
    bad = [dict(steps=1), dict(steps=50.0), dict(steps=True), dict(timestep_shift=0.0), dict(cfg_img_scale=0.5),
           dict(cfg_interval=(0.6, 0.4)), dict(cfg_interval=(0.5, 0.5)), dict(cfg_interval=(-0.1, 1.0)),
           dict(cfg_interval=(0.0, 1.5)), dict(cfg_renorm_type="local"), dict(cfg_renorm_min=1.5),
           dict(cfg_renorm_min=-0.1), dict(resolution=1000), dict(resolution=0), dict(cfg_text_scale=4.0)]
    for kwargs in bad:
        with pytest.raises(ValidationError):
            FlowSampling(**kwargs)
    with pytest.raises(ValidationError, match="multiple of 16"):
        FlowSampling(resolution=520)
    with pytest.raises(ValidationError):  # assignments are validated too
        s.cfg_interval = (0.9, 0.1)
