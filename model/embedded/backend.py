"""The embedded default model as a registered backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from model.registry import Backend, ModelSection, register


class EmbeddedSection(ModelSection):
    """`model:` of a recipe for the embedded model; its base checkpoint ships in model/embedded/base."""

    backend: Literal["embedded"] = "embedded"


def _load(cfg: EmbeddedSection, directory: str, device: str):
    from model.embedded.umm import EmbeddedUMM

    return EmbeddedUMM.from_pretrained(directory, device=device)


def _base(cfg: EmbeddedSection, cache_dir: str) -> str:
    from model.embedded.umm import BASE_DIR

    return str(BASE_DIR)


def _owns(directory: str) -> bool:
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("model_type") == "embedded-umm"
    except (OSError, ValueError):
        return False


def _load_trainable(directory: str, device: str, dtype: str):
    from model.embedded.umm import EmbeddedUMM

    return EmbeddedUMM.from_pretrained(directory, device=device)


def _check_rubric(rubric: dict) -> None:
    from model.world import Rubric

    try:
        Rubric.model_validate(rubric)
    except ValueError as exc:
        raise ValueError(f"judge.rubric does not fit the embedded world's Rubric: {exc}") from None


def _cli(app) -> None:
    from model.embedded.commands import register as register_commands
    from model.world.cli import app as world_app

    app.add_typer(world_app, name="world", help="The embedded model's synthetic world and its exact oracle.")
    register_commands(app)


register(Backend(name="embedded", config=EmbeddedSection, load=_load, base_checkpoint=_base, owns=_owns,
                 load_trainable=_load_trainable, check_rubric=_check_rubric, cli=_cli))
