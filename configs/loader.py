"""Load a typed config from YAML plus `key.path=value` overrides, failing before any work starts.

Every error is one `ConfigError` whose message names the file, the key path and what was expected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

T = TypeVar("T", bound=BaseModel)


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; recipes mean a float, and strict configs take no strings."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader)


class ConfigError(ValueError):
    pass


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated, and types are strict: a
    boolean or a string is not a number, a float is not an integer, and inf / NaN are no float's value."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, strict=True,
                              allow_inf_nan=False)


# a pair read from YAML or JSON arrives as a list: the tuple is lax about its container, strict about its items
IntPair = Annotated[tuple[StrictInt, StrictInt], Field(strict=False)]
FloatPair = Annotated[tuple[StrictFloat, StrictFloat], Field(strict=False)]


def parse_override(item: str) -> tuple[list[str], Any]:
    """`rollout.samples_per_prompt=4` -> (["rollout", "samples_per_prompt"], 4); values are YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(p.isidentifier() for p in path):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted key path")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: override {item!r}: {'.'.join(path[:i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


_UNION_TAGS = {"int", "float", "str", "bool", "list", "dict", "tuple", "none"}


def _where(err: dict[str, Any]) -> str:
    """The key path, without the member tags pydantic adds inside a union (`nproc.int`, `nproc.literal[...]`)."""
    parts = [str(p) for p in err["loc"]]
    while parts and (parts[-1] in _UNION_TAGS or "[" in parts[-1]):
        parts.pop()
    return ".".join(parts)


def _describe(err: dict[str, Any]) -> str:
    loc = _where(err) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if err["type"] == "value_error":  # our validators' own messages, without pydantic's prefix
        return f"{loc}: {err['ctx']['error']}" if err["loc"] else str(err["ctx"]["error"])
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{loc}: {err['msg'].lower()}{shown}"


def _merge(errors: list[dict[str, Any]]) -> list[str]:
    """One message per key: a union's members' complaints joined with 'or'."""
    by_key: dict[str, list[str]] = {}
    for e in errors:
        key = _where(e)
        by_key.setdefault(key, []).append(_describe(e).removeprefix(f"{key}: "))
    return [f"{k}: {' or '.join(v)}" if k else " or ".join(v) for k, v in by_key.items()]


def validate(model: type[T], data: dict[str, Any], source: str) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = "; ".join(_merge(exc.errors()))
        raise ConfigError(f"{source}: invalid config: {lines}") from None


def load_config(path: str | Path | None, model: type[T], overrides: list[str] | None = None) -> T:
    """Read YAML at `path` (or start from defaults when None), apply overrides, validate into `model`."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file")
        try:
            loaded = load_yaml(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides or [], source)
    return validate(model, data, source)


def canonical_json(obj: Any) -> str:
    """Stable text of a config (or any JSON-able value) for fingerprints."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
