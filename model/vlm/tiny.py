"""A tiny random-weight Qwen2-VL checkpoint that vLLM can serve on CPU, built locally.

No checkpoint or tokenizer files ship with any package here, so this builds all of it: a byte-level BPE tokenizer
trained on a fixed corpus, Qwen2-VL's special tokens and chat template, a small image processor and the model's
safetensors. Same seed, same files. Runs in the vLLM venv (transformers, tokenizers, torch):

    .venv-vllm/bin/python -m model.vlm.tiny OUT_DIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

SEED = 0
BPE_VOCAB = 512
# Qwen2-VL's added tokens, in its own order (ids follow the BPE vocabulary here).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2-VL-Instruct's chat template, as published with the model.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Images are resized to 56x56 (a multiple of patch 14 x merge 2): 16 patches, 4 image tokens; cheap on CPU.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 64 * 64
# The files whose presence marks a finished build (written last, by an atomic rename of the whole directory).
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MARKER = ".tiny-complete"


def _corpus() -> list[str]:
    # Fixed text shaped like the judge's prompts and answers, so the merges are the same on every machine.
    words = (
        "a an the image shows picture photo of with and or on in at to is are red green blue yellow black white "
        "circle square triangle star shape object objects one two three four left right above below next count "
        "color position score analysis prompt matches does not match partly clearly because rubric judge rate "
        "from zero ten reasoning answer json the user assistant system you are a helpful"
    ).split()
    lines = []
    for i, w in enumerate(words):
        nxt = words[(i * 7 + 3) % len(words)]
        lines.append(f"{w} {nxt}, {w}. {nxt} {w}")
        lines.append(json.dumps({"analysis": f"the image shows {w} {nxt}", "score": i % 11}))
    lines.append("0123456789 {}[]:,\"' .-")
    return lines * 4


def tiny_qwen2_tokenizer():
    """A byte-level BPE tokenizer with Qwen2(-VL)'s special tokens and chat template, trained on a fixed corpus: the same
    on every machine (no tokenizer files ship in any package)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Added after training so the BPE part is exactly BPE_VOCAB and the special ids follow it, as in Qwen2-VL.
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def is_complete(path: str | os.PathLike) -> bool:
    """Whether path holds a finished build (the marker is written last)."""
    path = Path(path)
    return (path / MARKER).is_file() and all((path / name).is_file() for name in REQUIRED)


def build(out_dir: str | os.PathLike) -> Path:
    """Build the checkpoint into out_dir (created); return it. A finished build there is kept as it is."""
    out = Path(out_dir).resolve()
    if is_complete(out):
        return out

    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = tiny_qwen2_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer)

    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            # head_dim 64: one of the sizes vLLM's CPU attention kernels take
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            # M-RoPE splits head_dim / 2 = 32 rotary pairs over (time, height, width)
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            embed_dim=64,
            hidden_size=128,  # the merger's output: the text hidden size
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    # bf16 on disk: the dtype vLLM runs it in on CPU, so loading converts nothing
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )

    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        chat_template=CHAT_TEMPLATE,
    )

    # Built beside the target and renamed into place: a reader never sees half a checkpoint, and two builders
    # racing on one directory both end with the same files.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)  # safetensors: transformers 5 writes nothing else
        processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The template also as its own file, so a loader that reads only the tokenizer or only the processor has it.
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        (tmp / MARKER).write_text(json.dumps({"seed": SEED, "vocab": vocab}) + "\n")
        if not is_complete(tmp):
            missing = [n for n in REQUIRED if not (tmp / n).is_file()]
            raise RuntimeError(f"tiny Qwen2-VL build is missing {missing}")
        if out.exists() and not is_complete(out):
            # only ever replace what a build writes (an older or broken build), never someone's other files
            if out.is_dir() and {p.name for p in out.iterdir()} <= {p.name for p in tmp.iterdir()}:
                shutil.rmtree(out)
            else:
                raise RuntimeError(f"{out} exists and is not a tiny Qwen2-VL build: choose another directory")
        try:
            os.rename(tmp, out)
        except OSError:
            if not is_complete(out):  # lost a race to another builder, which finished: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m model.vlm.tiny OUT_DIR", file=sys.stderr)
        return 2
    print(build(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
