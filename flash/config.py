"""Loading the stages' typed configs (teacher, distill, decoder, export) from JSON files."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None, what: str, **overrides: Any) -> T:
    """`cls` (a dataclass) from a JSON file (optional), then the non-None keyword overrides.

    Unknown keys, in the file or the overrides, are refused with the allowed ones named.
    """
    data: dict[str, Any] = json.loads(Path(path).read_text()) if path else {}
    known = {f.name for f in fields(cls)}
    unknown = sorted((set(data) | set(overrides)) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; allowed: {', '.join(sorted(known))}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**data)
