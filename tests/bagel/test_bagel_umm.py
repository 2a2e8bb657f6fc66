"""BagelUMM on the tiny random shape: every role, determinism, the official checkpoint files, the training terms
(flow matching, text cross-entropy at UniCorn's weight, Diffusion-DPO's shared noise)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.bagel.config import TINY
from model.bagel.umm import AE, WEIGHTS, BagelUMM, is_bagel_dir, layout
from model.bagel.vae import TINY_VAE_CONFIG
from model.protocol import CPRExample, TrainableModel
from model.vlm.tiny import tiny_qwen2_tokenizer

SAMPLING = {"steps": 4, "resolution": 128, "cfg_interval": [0.0, 1.0]}


@pytest.fixture(scope="module")
def bagel():
    return BagelUMM.random(TINY, TINY_VAE_CONFIG, tiny_qwen2_tokenizer(), seed=3)


def test_layout_packs_text_causally_and_images_as_one_position():
    e = torch.zeros((3, 4))
    from model.bagel.umm import Block

    text = Block(e, torch.zeros(3, dtype=torch.bool), image=False)
    image = Block(torch.zeros((4, 4)), torch.tensor([False, True, True, False]), image=True)
    emb, pos, gen, mask, nxt = layout([text, image, text])
    assert pos.tolist() == [0, 1, 2, 3, 3, 3, 3, 4, 5, 6] and nxt == 7
    assert gen.tolist() == [False] * 4 + [True, True] + [False] * 4
    assert not mask[0, 1] and mask[1, 0]  # text: causal
    assert mask[3, 6] and mask[6, 3] and mask[4, 0]  # image: full inside, sees what came before
    assert not mask[2, 3] and mask[7, 6] and not mask[7, 8]  # nothing sees what comes after its block


def test_generate_is_deterministic_per_seed_and_cfg_changes_the_image(bagel):
    a = bagel.generate(["a red circle", "two dogs"], [1, 2], [4.0, 4.0], **SAMPLING)
    b = bagel.generate(["a red circle"], [1], [4.0], **SAMPLING)
    c = bagel.generate(["a red circle"], [1], [1.0], **SAMPLING)
    d = bagel.generate(["a red circle"], [7], [4.0], **SAMPLING)
    assert all(im.size == (128, 128) for im in a)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))  # the same image alone or in a batch
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))  # text CFG is applied
    assert not np.array_equal(np.asarray(a[0]), np.asarray(d[0]))
    with pytest.raises(ValueError, match="exceeds this network's latent grid"):
        bagel.generate(["x"], [0], [1.0], steps=3, resolution=256)


def test_understanding_roles_and_a_judge_that_always_scores(bagel):
    im = bagel.generate(["a red circle"], [1], [4.0], **SAMPLING)[0]
    assert isinstance(bagel.propose(["colors"], [["a red circle"]], [3])[0], str)
    assert isinstance(bagel.answer([im], ["what colour is the circle?"])[0], str)
    j = bagel.judge(["a red circle", "two dogs"], [im, im])
    assert all(x.parse_ok and 0 <= x.score <= 10 for x in j)
    assert json.loads(j[0].raw)["score"] == j[0].score
    r = bagel.reflect(["a red circle"], [im], [5], [4.0], **SAMPLING, cfg_img_scale=2.0)
    assert r[0].size == (128, 128)


def test_the_official_layout_round_trips(bagel, tmp_path):
    bagel.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"llm_config.json", "vit_config.json", WEIGHTS, AE, "tokenizer.json"} <= names
    assert is_bagel_dir(str(tmp_path)) and not any(n.endswith((".bin", ".pt")) for n in names)
    again = BagelUMM.from_pretrained(tmp_path)
    assert again.model_id == bagel.model_id
    a = bagel.generate(["two dogs"], [4], [4.0], **SAMPLING)[0]
    b = again.generate(["two dogs"], [4], [4.0], **SAMPLING)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_training_terms_for_every_kind_reach_both_experts(bagel):
    assert isinstance(bagel, TrainableModel)
    red, blue = Image.new("RGB", (128, 128), (200, 30, 30)), Image.new("RGB", (128, 128), (30, 30, 200))
    exs = [CPRExample("generation", "a red square", target_image=red),
           CPRExample("caption", "Write the prompt of this image.", target_text="a red square", input_image=red),
           CPRExample("judgement", "a red square", target_text="it is red", input_image=red,
                      meta={"prompt": "a red square", "score": 9}),
           CPRExample("reflection", "a red square", input_image=blue, target_image=red)]
    bagel.train()
    bagel.net.zero_grad(set_to_none=True)
    terms = bagel.loss_terms(exs)
    assert list(terms) == ["generation", "caption", "judgement", "reflection"]
    assert all(t.count == 1 and torch.isfinite(t.loss) for t in terms.values())
    sum(t.loss for t in terms.values()).backward()
    layer = bagel.net.language_model.model.layers[0]
    assert layer.mlp_moe_gen.up_proj.weight.grad.abs().sum() > 0  # the flow loss trains the generation expert
    assert layer.mlp.up_proj.weight.grad.abs().sum() > 0  # the text loss the understanding one
    assert bagel.net.vit_model.vision_model.embeddings.patch_embedding.weight.grad is None  # the ViT is frozen
    assert bagel.default_loss_weights == {"caption": 0.1, "judgement": 0.1}  # UniCorn's ce_weight
    with pytest.raises(ValueError, match="unknown CPR kind"):
        bagel.loss_terms([CPRExample("painting", "x")])
    bagel.train(False)


def test_diffusion_dpo_scores_both_images_under_the_same_noise(bagel):
    red, blue = Image.new("RGB", (128, 128), (200, 30, 30)), Image.new("RGB", (128, 128), (30, 30, 200))
    pair = [CPRExample("preference", "a red square", target_image=red, rejected_image=blue)]
    same = [CPRExample("preference", "a red square", target_image=red, rejected_image=red)]
    pc, pr, n = bagel.preference_logprobs(pair)
    sc, sr, _ = bagel.preference_logprobs(same)
    assert n == 8 * 8 * 64 and pc.shape == (1,) and pc.requires_grad
    assert torch.equal(sc, sr)  # one image twice: identical noise and time give identical errors
    assert not torch.equal(pc, pr)
    twin = BagelUMM(bagel.net, bagel.vae, bagel.tok)  # a reference model: its first call draws what ours first drew
    mine = BagelUMM(bagel.net, bagel.vae, bagel.tok)
    assert torch.equal(mine.preference_logprobs(pair)[0], twin.preference_logprobs(pair)[0])
    with pytest.raises(NotImplementedError, match="Flow-GRPO"):
        bagel.image_token_logprobs(pair)


def test_the_cfg_branches_in_one_batch_equal_each_alone(bagel):
    """The sampler's branches (a prompt's context, no context, a longer context) run as one padded, masked batch:
    each branch's velocity is what it is alone."""
    side, g = 128, 8
    x = torch.randn((1, g * g, 64), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7])
    with torch.no_grad():
        prefixes = [bagel._prefix([bagel.text_block("a red circle")]), bagel._prefix([]),
                    bagel._prefix([bagel.text_block("two small dogs left of a large blue car")])]
        together = bagel._velocities(prefixes, x, t, side)
        alone = torch.cat([bagel._velocities([p], x, t, side) for p in prefixes])
    assert together.shape == (3, g * g, 64)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1])  # the context matters


def test_attention_by_segments_is_the_masked_attention(bagel):
    """The mask-free attention (image blocks keep the flash kernels) sees exactly what the packed mask allows."""
    from model.bagel.umm import segments_of

    im = Image.new("RGB", (128, 128), (10, 200, 40))
    with torch.no_grad():
        blocks = [bagel.text_block("a green square"), bagel.vit_block(im),
                  bagel.latent_block(torch.randn(64, 64), 0.3, 128), bagel.text_block("what is it?", True)]
        emb, pos, gen, mask, _ = layout(blocks)
        masked = bagel.net.forward_packed(emb, pos, gen, mask)
        by_segments = bagel.net.forward_packed(emb, pos, gen, None, segments=segments_of(blocks))
    torch.testing.assert_close(by_segments, masked, rtol=1e-4, atol=1e-5)


def test_images_drawn_together_are_the_images_drawn_alone(bagel):
    """`image_batch` > 1 draws several images (and their CFG branches) in one forward per step: the same images up
    to float rounding, whatever their contexts' lengths."""
    prompts, seeds, scales = ["a red circle", "two small dogs left of a large blue car", "x"], [1, 2, 3], [4.0, 1.0, 6.0]
    alone = bagel.generate(prompts, seeds, scales, **SAMPLING)
    bagel.settings = bagel.settings.model_copy(update={"image_batch": 3})
    try:
        together = bagel.generate(prompts, seeds, scales, **SAMPLING)
    finally:
        bagel.settings = bagel.settings.model_copy(update={"image_batch": 1})
    for a, b in zip(alone, together):
        assert np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).max() <= 2


def test_packed_examples_see_only_themselves(bagel):
    """Training packs a batch's examples into one forward: each example's hidden states are what it gives alone."""
    im = Image.new("RGB", (128, 128), (10, 200, 40))
    with torch.no_grad():
        seqs = [[bagel.text_block("a green square"), bagel.latent_block(torch.randn(64, 64), 0.3, 128)],
                [bagel.vit_block(im), bagel.text_block("what is it?", True)],
                [bagel.text_block("two dogs and a long prompt here"), bagel.latent_block(torch.randn(64, 64), 0.9, 128)]]
        packed = bagel._run_packed(seqs)
        alone = [bagel._run(s)[0] for s in seqs]
    for p, a in zip(packed, alone):
        torch.testing.assert_close(p, a, rtol=1e-4, atol=1e-5)


def test_packed_attention_backward_is_the_masked_attentions(bagel):
    """Training's packed forward cuts rows and keys into pieces per block and per example: its gradients are the
    gradients through the packed sequence's full mask."""
    from model.bagel.umm import segments_of

    im = Image.new("RGB", (128, 128), (10, 200, 40))
    seqs = [[bagel.text_block("a green square"), bagel.latent_block(torch.randn(64, 64), 0.3, 128)],
            [bagel.vit_block(im), bagel.text_block("what is it?", True)],
            [bagel.text_block("two dogs and a long prompt here"), bagel.latent_block(torch.randn(64, 64), 0.9, 128)]]
    parts, segs, offset = [layout(b) for b in seqs], [], 0
    for blocks, part in zip(seqs, parts):
        segs += [(s + offset, e + offset, c, offset) for s, e, c in segments_of(blocks)]
        offset += part[0].shape[0]
    emb = torch.cat([p[0] for p in parts]).detach().requires_grad_()
    pos, gen = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    mask = torch.block_diag(*[p[3] for p in parts])
    w = torch.randn(emb.shape)
    grads = [torch.autograd.grad((bagel.net.forward_packed(emb, pos, gen, m, segments=s) * w).sum(), emb)[0]
             for m, s in ((mask, None), (None, segs))]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4)  # fp32 sums in another order
    assert grads[0].abs().sum(-1).gt(0).all()  # every row's gradient flows


def test_a_checkpoint_named_by_ema_safetensors_is_a_checkpoint(bagel, tmp_path):
    """The official layout names its weights ema.safetensors: the registry, the id and preflight take it."""
    from configs.loader import load_config
    from configs.schema import PROJECT_ROOT, CycleConfig
    from flows.preflight import PreflightError, check_checkpoint
    from model import registry
    from storage import Registry
    from tasks.models import register

    d = bagel.save_pretrained(tmp_path / "child")
    assert registry.for_directory(str(d)).name == "bagel"
    ckpt = register(str(d), str(tmp_path / "store"), "default")
    assert ckpt == bagel.model_id and "ema.safetensors" in Registry(str(tmp_path / "store")).require(ckpt).files
    recipe = PROJECT_ROOT / "configs/cycle/bagel-tiny-random.yaml"
    check_checkpoint(load_config(recipe, CycleConfig, [f"run.store={tmp_path}/store", f"model.checkpoint={d}"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match="no model.safetensors or ema.safetensors"):
        check_checkpoint(load_config(recipe, CycleConfig, [f"run.store={tmp_path}/store",
                                                           f"model.checkpoint={tmp_path / 'empty'}"]))


def test_texts_decoded_together_are_the_texts_decoded_alone(bagel):
    """propose / answer / judge decode `text_batch` sequences in lockstep over left-padded caches: each text is
    what it is decoded alone, greedy or seeded."""
    im = bagel.generate(["a red circle"], [1], [4.0], **SAMPLING)[0]
    ctx = [[bagel.vit_block(im), bagel.text_block(q, open_answer=True)]
           for q in ("what colour?", "how many shapes are in this picture, and where?", "x")]
    together = bagel._decode_many(ctx, 12)
    assert together == [bagel._decode_many([c], 12)[0] for c in ctx]
    sampled = bagel._decode_many(ctx, 12, [5, 6, 7], temperature=0.9)
    assert sampled == [bagel._decode_many([c], 12, [s], temperature=0.9)[0] for c, s in zip(ctx, [5, 6, 7])]
    assert sampled != together


def test_routing_a_block_of_latents_by_overwriting_its_few_markers_is_exact(bagel, monkeypatch):
    """An image block's two markers among its latents: the generation weights run over every row and the markers'
    rows are overwritten; outputs and gradients equal routing by gather and scatter."""
    from model.bagel import modeling

    latents = torch.randn(64, 64)

    def run():
        bagel.net.zero_grad(set_to_none=True)
        h = bagel._run([bagel.latent_block(latents, 0.4, 128)])[0]  # 2 markers among 66 rows: "few"
        h.square().mean().backward()
        g = bagel.net.language_model.model.layers[0].mlp.up_proj.weight.grad.clone()
        return h.detach(), g

    assert 2 * modeling.FEW <= 66
    few, g_few = run()
    monkeypatch.setattr(modeling, "FEW", 10**9)  # never "few": gather and scatter every time
    full, g_full = run()
    torch.testing.assert_close(few, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_few, g_full, rtol=1e-4, atol=1e-7)
    bagel.net.zero_grad(set_to_none=True)


def test_a_bagel_recipe_without_usable_weights_is_one_line_before_any_work(tmp_path):
    """model.path must be a directory in the official layout unless the weights are random: refused by preflight
    (exit 2, one line, nothing written), not by a traceback once the run has started."""
    from typer.testing import CliRunner

    from configs.schema import PROJECT_ROOT
    from flows.cli import app

    store = tmp_path / "store"
    args = ["run", str(PROJECT_ROOT / "configs/cycle/bagel-tiny-random.yaml"), f"run.store={store}",
            "model.random_weights=false", f"model.path={tmp_path / 'nowhere'}"]
    res = CliRunner().invoke(app, args)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: model.path") and "official BAGEL layout" in lines[0]
    assert not store.exists() or not any(store.rglob("*"))


def test_fused_norms_rotary_and_silu_are_the_eager_arithmetic(bagel, monkeypatch):
    """`Settings.compile`: the LLM's norms, rotary embedding and SiLU-multiply through torch.compile (here forced on
    the CPU, where it is off by default) give eager's outputs and gradients, and the compiled functions really ran."""
    from model.bagel import modeling

    latents = torch.randn(64, 64)

    def run():
        bagel.net.zero_grad(set_to_none=True)
        h = bagel._run([bagel.text_block("a red square"), bagel.latent_block(latents, 0.4, 128)])[0]
        h.square().mean().backward()
        layer = bagel.net.language_model.model.layers[0]
        return h.detach(), layer.mlp_moe_gen.gate_proj.weight.grad.clone(), layer.input_layernorm.weight.grad.clone()

    bagel.net.fuse_kernels(False)
    eager = run()
    monkeypatch.setattr(modeling, "FUSE_ON", {"cpu"})
    monkeypatch.setattr(modeling, "_RAN", set())
    bagel.settings = bagel.settings.model_copy(update={"compile": True})
    try:
        fused = run()
    finally:
        bagel.settings = bagel.settings.model_copy(update={"compile": False})
    assert modeling._RAN == {modeling._rms_norm, modeling._rope, modeling._silu_mul} and not modeling._EAGER
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    bagel.net.zero_grad(set_to_none=True)


def test_a_training_target_is_encoded_once_and_drawn_as_if_encoded_afresh(bagel):
    """The frozen VAE's posterior of a target image is kept: seen again, the image is not encoded, and each draw
    equals encoding afresh with the same generator; the cache stays within its size."""
    ims = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (128, 128, 3), dtype=np.uint8)) for i in range(3)]
    calls = []
    hook = bagel.vae.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        bagel._posteriors.clear()
        bagel._posterior_bytes = 0
        first = bagel.clean_latents(ims[:2], 128, torch.Generator().manual_seed(5))
        again = bagel.clean_latents(ims[:2], 128, torch.Generator().manual_seed(5))
        other = bagel.clean_latents(ims[:2], 128, torch.Generator().manual_seed(6))
        assert calls == [2]  # one encode of the two images, none after
        torch.testing.assert_close(first, again, rtol=0, atol=0)
        assert not torch.equal(first, other)  # a new draw from the same posterior
        bagel.settings = bagel.settings.model_copy(update={"latent_cache_gib": 0.0})
        fresh = bagel.clean_latents(ims[:2], 128, torch.Generator().manual_seed(5))
        torch.testing.assert_close(fresh, first, rtol=1e-5, atol=1e-5)
        one = bagel._posteriors[next(iter(bagel._posteriors))]
        cap = 2.5 * one.numel() * one.element_size()  # room for two posteriors
        bagel.settings = bagel.settings.model_copy(update={"latent_cache_gib": cap / 2**30})
        calls.clear()
        bagel.clean_latents(ims[2:], 128)
        bagel.clean_latents(ims[:1], 128)  # the oldest was evicted for the third image: encoded again
        assert calls == [1, 1] and len(bagel._posteriors) == 2
    finally:
        hook.remove()
        bagel.settings = bagel.settings.model_copy(update={"latent_cache_gib": 2.0})


def test_training_hooks_count_one_expert_and_set_the_speed_settings(bagel):
    """The posttrain worker's optional hooks: MFU's parameter count is one expert's layers (+ the latent glue for
    image kinds), never both experts; configure_training switches the fused kernels and says what is in force."""
    lm = bagel.net.language_model.model
    und = sum(p.numel() for k, p in lm.named_parameters() if k.startswith("layers.") and "moe_gen" not in k)
    text, image = bagel.params_on_path("caption"), bagel.params_on_path("generation")
    assert text == und + lm.norm.weight.numel()  # the two experts have the same shapes
    assert image - text == sum(p.numel() for p in [*bagel.net.vae2llm.parameters(), *bagel.net.llm2vae.parameters()])
    assert bagel.params_on_path("preference") == image
    before = bagel.settings
    try:
        speed = bagel.configure_training(compile=False, loss_chunk=4096)
        assert speed["compile"] is False and not bagel.net.language_model.model.norm.fuse
        assert bagel.configure_training(compile=True, loss_chunk=0)["compile"] is True
        assert bagel.net.language_model.model.layers[0].mlp_moe_gen.fuse
    finally:
        bagel.settings = before


@pytest.mark.parametrize("setting, says", [("latent_cache_gib=-1", "greater than or equal to 0"),
                                           ("compile=maybe", "valid boolean"), ("imgae_batch=4", "Extra inputs")])
def test_a_bad_backend_setting_is_one_line_before_any_work(tmp_path, setting, says):
    """`model.settings` is checked against the backend's Settings when the recipe loads: exit 2, one line naming
    the field, nothing written (not an error once the model loads mid-run)."""
    from typer.testing import CliRunner

    from configs.schema import PROJECT_ROOT
    from flows.cli import app

    store = tmp_path / "store"
    res = CliRunner().invoke(app, ["run", str(PROJECT_ROOT / "configs/cycle/bagel-tiny-random.yaml"),
                                   f"run.store={store}", f"model.settings.{setting}"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert f"model.settings: {setting.split('=')[0]}: " in lines[0] and says in lines[0]
    assert not store.exists() or not any(store.rglob("*"))
