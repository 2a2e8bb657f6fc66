"""The shape of BAGEL's network, and the official checkpoint's `llm_config.json` / `vit_config.json`.

Where each BAGEL-7B-MoT value comes from:
- `llm_config.json` is the `config.json` of Qwen2.5-7B-Instruct, BAGEL's base LLM (said by the BAGEL maintainers in
  ByteDance-Seed/Bagel issue #64; the Qwen2-7B widths: hidden 3584, MLP 18944, 28 layers, 28 heads, 4 KV heads,
  vocab 152064, RoPE theta 1e6, RMSNorm eps 1e-6, untied lm_head). `qk_norm` and the MoT layer are not in that file:
  the official `app.py` / `train/pretrain_unified_navit.py` set `qk_norm=True`, `tie_word_embeddings=False` and
  `layer_module="Qwen2MoTDecoderLayer"` after reading it.
- `vit_config.json` is SigLIP so400m/14 at 980 px (hidden 1152, MLP 4304, 27 layers, 16 heads, patch 14, image
  980), as read by third-party BAGEL loaders (lightx2v's BAGEL tests); act `gelu_pytorch_tanh` and LayerNorm eps
  1e-6 are SigLIP's defaults, which the official `SiglipVisionConfig` also uses. The official code builds one layer
  fewer than the file says (`vit_config.num_hidden_layers -= 1` in `app.py`; `+ 1 + vit_select_layer(-2)` in
  training) and no RoPE (`rope=False`), so the checkpoint holds 26 ViT layers: `vit_layers` below.
- The rest is the official `BagelConfig` as `app.py` builds it: `latent_patch_size=2`, `max_latent_size=64`,
  `vit_max_num_patch_per_side=70`, `connector_act="gelu_pytorch_tanh"`, `interpolate_pos=False` and
  `timestep_shift=1.0` (BagelConfig's defaults); FLUX's VAE gives 16 latent channels and 8x downsampling
  (`modeling/autoencoder.py`).

The official code reads only the two JSON files (everything else is in its scripts), so a checkpoint we write keeps
our other fields in a third file, `bagel_net.json`, that the official code never opens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from configs.loader import Strict

LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"
NET_CONFIG = "bagel_net.json"


class LlmConfig(Strict):
    """The Qwen2 fields the network reads; the file's other keys ride along in `extra`, written back unchanged."""

    model_config = ConfigDict(frozen=True)

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    # not in the official file; its loader forces True, so a file without the key means True
    qk_norm: bool = True
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _heads(self) -> LlmConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.tie_word_embeddings:
            raise ValueError("BAGEL unties lm_head from embed_tokens (the official loader forces it)")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class VitConfig(Strict):
    """SigLIP vision fields as the file holds them: `num_hidden_layers` is the file's count, one more than built."""

    model_config = ConfigDict(frozen=True)

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int = 3
    image_size: int
    patch_size: int
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _shape(self) -> VitConfig:
        if self.num_hidden_layers < 2:
            raise ValueError("vit num_hidden_layers counts the layer BAGEL drops: at least 2")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vit hidden_size is not a multiple of its heads")
        return self


# the fields of llm_config.json / vit_config.json that are typed above; any other key goes to `extra`
_LLM_KEYS = set(LlmConfig.model_fields) - {"extra"}
_VIT_KEYS = set(VitConfig.model_fields) - {"extra"}


class BagelConfig(Strict):
    """The whole network: LLM, ViT and the glue between them and the VAE latents."""

    model_config = ConfigDict(frozen=True)

    llm: LlmConfig
    vit: VitConfig
    latent_channels: int = 16
    vae_downsample: int = 8
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float = 1.0

    @model_validator(mode="after")
    def _positions(self) -> BagelConfig:
        # the ViT's own position table has (image_size / patch)^2 rows, indexed like vit_pos_embed
        per_side = self.vit.image_size // self.vit.patch_size
        if self.vit_max_num_patch_per_side > per_side:
            raise ValueError(f"vit_max_num_patch_per_side {self.vit_max_num_patch_per_side} exceeds the ViT's "
                             f"{per_side} positions per side")
        return self

    @property
    def vit_layers(self) -> int:
        """ViT layers built and saved: the file's count less the last, which BAGEL drops."""
        return self.vit.num_hidden_layers - 1

    @property
    def latent_downsample(self) -> int:
        """Image pixels per latent token along a side (VAE downsampling times the patch packing)."""
        return self.vae_downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_channels * self.latent_patch_size ** 2

    # ---- the official files ----

    def llm_json(self) -> dict[str, Any]:
        d = self.llm.model_dump(exclude={"extra"})
        if d["qk_norm"]:
            del d["qk_norm"]  # the official file has no such key and means True: keep it as published
        return {**self.llm.extra, **d}

    def vit_json(self) -> dict[str, Any]:
        d = self.vit.model_dump(exclude={"extra"})
        return {**self.vit.extra, **d}

    def net_json(self) -> dict[str, Any]:
        return self.model_dump(exclude={"llm", "vit"})

    def write_official(self, directory: str | Path) -> None:
        """Write llm_config.json and vit_config.json as the official loader reads them, plus bagel_net.json."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in ((LLM_CONFIG, self.llm_json()), (VIT_CONFIG, self.vit_json()), (NET_CONFIG, self.net_json())):
            (d / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_official_dir(cls, directory: str | Path, **overrides: Any) -> BagelConfig:
        """Read an official checkpoint directory. Fields outside the two JSON files come from bagel_net.json when
        present, else from the official scripts' values (BAGEL_7B_MOT's); `overrides` win over both."""
        d = Path(directory)
        llm = _split(json.loads((d / LLM_CONFIG).read_text()), _LLM_KEYS)
        llm["tie_word_embeddings"] = False  # as the official loader sets it, whatever the file says
        vit = _split(json.loads((d / VIT_CONFIG).read_text()), _VIT_KEYS)
        net = BAGEL_7B_MOT.net_json()
        if (d / NET_CONFIG).is_file():
            net.update(json.loads((d / NET_CONFIG).read_text()))
        net.update(overrides)
        return cls.model_validate({**net, "llm": llm, "vit": vit})


def _split(data: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    typed = {k: v for k, v in data.items() if k in keys}
    typed["extra"] = {k: v for k, v in data.items() if k not in keys}
    return typed


# Qwen2.5-7B-Instruct's config.json, less the fields typed above (see the module docstring)
_QWEN25_7B_EXTRA: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "sliding_window": 131072,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
}

BAGEL_7B_MOT = BagelConfig(
    llm=LlmConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, initializer_range=0.02, tie_word_embeddings=False,
                  qk_norm=True, extra=_QWEN25_7B_EXTRA),
    vit=VitConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  num_channels=3, image_size=980, patch_size=14, hidden_act="gelu_pytorch_tanh",
                  layer_norm_eps=1e-6, attention_dropout=0.0, extra={"model_type": "siglip_vision_model"}),
    latent_channels=16, vae_downsample=8, latent_patch_size=2, max_latent_size=64, vit_max_num_patch_per_side=70,
    connector_act="gelu_pytorch_tanh", interpolate_pos=False, timestep_shift=1.0,
)

# A toy of the same structure for CPU tests: 8x8 latent tokens (128 px images), 8x8 ViT patches (112 px).
TINY = BagelConfig(
    llm=LlmConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
                  extra={"model_type": "qwen2"}),
    vit=VitConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=112,
                  patch_size=14, extra={"model_type": "siglip_vision_model"}),
    max_latent_size=8, vit_max_num_patch_per_side=8,
)
