"""Names that become path components (runs, datasets, stages, registries) are validated here, once."""

from __future__ import annotations

import re

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class InvalidNameError(ValueError):
    pass


def validate_name(name: str, what: str = "name") -> str:
    """Refuse anything that could escape the store: separators, '..', absolute paths, empty or odd names."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-100 letters, digits, '_', '-' or '.', starting with a letter or digit, "
            "with no '/', no '..' and no absolute path")
    return name
