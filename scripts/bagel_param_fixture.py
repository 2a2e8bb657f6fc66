"""Derive tests/bagel/fixtures/bagel_7b_mot_params.json ({name: shape} of BAGEL-7B-MoT's `ema.safetensors`) from the
OFFICIAL modeling code, not from ours.

It builds the official `Bagel(language_model, vit_model, config)` exactly as the official `app.py` does (read
llm_config.json / vit_config.json, `qk_norm=True`, `tie_word_embeddings=False`,
`layer_module="Qwen2MoTDecoderLayer"`, ViT `rope=False` and `num_hidden_layers -= 1`, the FLUX VAE params of
`load_ae`, `max_latent_size=64`, `vit_max_num_patch_per_side=70`, `init_empty_weights()`, then
`convert_conv2d_to_linear(vit_config, meta=True)`), and writes the names and shapes of its `state_dict()`. Official
saving (`train/fsdp_utils.py`: FSDP FULL_STATE_DICT of the EMA model, then `save_file`) keeps exactly the state_dict:
parameters, the frozen sin-cos `pos_embed` parameters included, and no non-persistent buffer (RoPE `inv_freq`), so
nothing is dropped.

Only `flash_attn` is stubbed: the official modules import `flash_attn_varlen_func` at module level, and building on
the meta device never calls it.

The official code pins transformers 4.49, so this runs in a scratch venv, never the repo's. It was run as:

    python3.11 -m venv /tmp/bagel-ref
    /tmp/bagel-ref/bin/pip install -q torch==2.13.0 transformers==4.49.0 numpy safetensors pillow \\
        einops==0.8.1 tqdm "accelerate>=0.34"
    # a checkout of ByteDance-Seed/Bagel (the `fetch` tool's git dir), at commit 056b5fd
    git --git-dir=/work/.mirror/ByteDance-Seed+Bagel/repo archive HEAD | tar -x -C /tmp/bagel-src
    /tmp/bagel-ref/bin/python scripts/bagel_param_fixture.py /tmp/bagel-src \\
        --out tests/bagel/fixtures/bagel_7b_mot_params.json

The two JSON files it builds from are LLM_JSON / VIT_JSON below (the published files' values; where they come from is
in model/bagel/config.py, whose BAGEL_7B_MOT a test keeps equal to them); `--config-dir` reads real ones instead.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import sys
import tempfile
import types

# Qwen2.5-7B-Instruct's config.json, which BAGEL ships as llm_config.json
LLM_JSON = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

# SigLIP so400m/14 at 980 px, as BAGEL ships vit_config.json
VIT_JSON = {
    "attention_dropout": 0.0,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "image_size": 980,
    "intermediate_size": 4304,
    "layer_norm_eps": 1e-06,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 27,
    "patch_size": 14,
}


def _stub_flash_attn() -> None:
    def flash_attn_varlen_func(*args, **kwargs):
        raise RuntimeError("flash_attn is stubbed: building on the meta device never attends")

    mod = types.ModuleType("flash_attn")
    # a spec, so transformers' availability probe (find_spec) answers instead of raising; it then finds no
    # installed distribution and reports flash_attn unavailable
    mod.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    sys.modules["flash_attn"] = mod


def official_params(bagel_src: str, config_dir: str) -> dict[str, list[int]]:
    _stub_flash_attn()
    sys.path.insert(0, os.path.abspath(bagel_src))
    from accelerate import init_empty_weights
    from modeling.autoencoder import load_ae
    from modeling.bagel import (
        Bagel,
        BagelConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    # from here on, app.py's "Model Initialization", line for line
    llm_config = Qwen2Config.from_json_file(os.path.join(config_dir, "llm_config.json"))
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"

    vit_config = SiglipVisionConfig.from_json_file(os.path.join(config_dir, "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1

    _, vae_config = load_ae(local_path=None)  # the FLUX VAE's params; its weights are not part of ema.safetensors

    config = BagelConfig(
        visual_gen=True,
        visual_und=True,
        llm_config=llm_config,
        vit_config=vit_config,
        vae_config=vae_config,
        vit_max_num_patch_per_side=70,
        connector_act="gelu_pytorch_tanh",
        latent_patch_size=2,
        max_latent_size=64,
    )

    with init_empty_weights():
        language_model = Qwen2ForCausalLM(llm_config)
        vit_model = SiglipVisionModel(vit_config)
        model = Bagel(language_model, vit_model, config)
        model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config, meta=True)

    return {name: list(t.shape) for name, t in model.state_dict().items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bagel_src", help="a checkout of ByteDance-Seed/Bagel (files, not a git dir)")
    ap.add_argument("--out", required=True, help="where to write the {name: shape} JSON")
    ap.add_argument("--config-dir", help="a directory with llm_config.json and vit_config.json (default: the "
                                         "published values above)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        config_dir = args.config_dir
        if config_dir is None:
            config_dir = tmp
            for name, data in (("llm_config.json", LLM_JSON), ("vit_config.json", VIT_JSON)):
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(data, f, indent=2)
        params = official_params(args.bagel_src, config_dir)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(sorted(params.items())), f, indent=1)
        f.write("\n")
    total = 0
    for shape in params.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    print(json.dumps({"tensors": len(params), "parameters": total, "out": args.out}))


if __name__ == "__main__":
    main()
