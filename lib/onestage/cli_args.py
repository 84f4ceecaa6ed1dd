"""What the command line and ``onestage reproduce`` share: the one-line user error and the ``KEY=VALUE`` parser of
``--set`` / ``--train-set`` / ``--model-set`` (a module of its own, so that ``onestage.cli`` and
``onestage.experiments.runner`` both import it instead of each other)."""
from __future__ import annotations

import ast
from typing import Optional, Sequence

__all__ = ["UserError", "parse_value", "parse_sets"]


class UserError(Exception):
    """A mistake in the command line or the inputs: reported as one line, exit code 2."""


def parse_value(text: str):
    """``3`` → int, ``0.5`` → float, ``(1, 2)`` → tuple, ``true``/``false`` → bool, anything else → str."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_sets(items: Optional[Sequence[str]], what: str) -> dict:
    """``["lr=0.01", "min-size=(256, 288)"]`` → ``{"lr": 0.01, "min_size": (256, 288)}``; ``what`` names the option
    in the error a malformed item raises (:class:`UserError`)."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"{what} expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = parse_value(value.strip())
    return out
