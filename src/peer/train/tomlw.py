"""A tiny TOML writer for config dicts (tables of str / int / float / bool / lists of those).

``tomllib.loads(dumps(d)) == d`` for every such dict (tested). Written by hand to avoid a dependency.
"""

from __future__ import annotations

import json
import math
import re

__all__ = ["dumps"]

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _value(v, name: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x, name) for x in v) + "]"
    raise ValueError(f"{name}: cannot write {type(v).__name__} value {v!r} to TOML")


def dumps(data: dict) -> str:
    """TOML text for ``data``: top-level scalars first, then one ``[table]`` per nested dict."""
    lines: list[str] = []

    def emit(table: dict, prefix: str) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, dict)]
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        for k, v in scalars:
            lines.append(f"{_key(k)} = {_value(v, f'{prefix}.{k}' if prefix else k)}")
        if prefix or scalars:
            lines.append("")
        for k, v in tables:
            emit(v, f"{prefix}.{_key(k)}" if prefix else _key(k))

    emit(data, "")
    return "\n".join(lines).rstrip("\n") + "\n"
