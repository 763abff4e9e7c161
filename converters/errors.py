"""The errors converters raises: one user-facing line each, with the exit code a command line should use.

Exit codes (shared with ``onnxrepair``'s CLI): 2 usage (a path that is missing, a directory, an option that
cannot be honoured), 3 the model is unreadable or unsupported. ``onnxrepair.errors`` builds its own
hierarchy on these classes, so ``except onnxrepair.errors.ModelError`` catches what converters raises.
"""

from __future__ import annotations


class ConverterError(Exception):
    """Base class: one clear line; ``exit_code`` is what a CLI exits with."""

    exit_code: int = 3


class ConverterUsageError(ConverterError):
    """The caller asked for something that cannot be done as asked (a missing path, a bad option)."""

    exit_code = 2


class ModelError(ConverterError):
    """The model file cannot be read, fails the checker, uses unsupported ops, or cannot be exported."""

    exit_code = 3


class UnsupportedOpsError(ModelError):
    """Every op the conversion cannot handle, reported together.

    ``ops`` holds ``(domain, op_type, since_version)``; ``nodes`` maps each of them to the names of the
    nodes that use it (the first few), so a user can find them in a viewer.
    """

    def __init__(self, ops: list[tuple[str, str, int]], path: str = "", nodes: dict | None = None,
                 reasons: dict | None = None) -> None:
        self.ops = sorted(set(ops))
        self.nodes = dict(nodes or {})
        self.reasons = dict(reasons or {})

        def one(key) -> str:
            d, op, v = key
            s = f"{d or 'ai.onnx'}::{op}-{v}"
            names = [n for n in self.nodes.get(key) or [] if n]  # unnamed nodes have nothing to show
            if names:
                more = f" +{len(names) - 3}" if len(names) > 3 else ""
                s += f" (node {', '.join(repr(n) for n in names[:3])}{more})"
            if self.reasons.get(key):
                s += f": {self.reasons[key]}"
            return s

        where = f"{path}: " if path else ""
        super().__init__(f"{where}unsupported ops for conversion: {', '.join(one(k) for k in self.ops)}")


def one_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (the type name if it has none), at most ``limit`` chars."""
    for line in str(e).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(e).__name__


__all__ = ["ConverterError", "ConverterUsageError", "ModelError", "UnsupportedOpsError", "one_line"]
