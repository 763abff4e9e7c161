"""Error types that map to the CLI's documented exit codes.

Exit codes (README "Exit codes"):
    0  success
    1  validation or accuracy-retention check failed
    2  usage error (bad flags, bad data, bad paths)
    3  model unreadable or unsupported

Library callers catch :data:`USER_ERRORS` (``OnnxRepairError`` and converters' ``ConverterError``, the base of
:class:`ModelError` / :class:`UnsupportedOpsError`); the CLI prints ``str(err)`` as one line and exits with
``err.exit_code``.
"""

from __future__ import annotations

from converters.errors import ConverterError, ConverterUsageError
from converters.errors import ModelError as _ModelError
from converters.errors import UnsupportedOpsError as _UnsupportedOpsError


class OnnxRepairError(Exception):
    """Base class: one clear, user-facing line."""

    exit_code: int = 2


class UsageError(OnnxRepairError):
    """The user asked for something that cannot be done as asked (flags, paths, data)."""

    exit_code = 2


class DataError(UsageError):
    """Data that does not fit the model or cannot be read."""


# The model errors are converters' own (``converters`` stands alone and raises them); re-exported here so
# ``from onnxrepair.errors import ModelError`` and ``except ModelError`` keep working across both packages.
ModelError = _ModelError
UnsupportedOpsError = _UnsupportedOpsError


class ValidationFailed(OnnxRepairError):
    """A numerical comparison or the accuracy-retention contract failed."""

    exit_code = 1


# everything that is the user's to fix (one line, a documented exit code), from either package
USER_ERRORS: tuple[type[Exception], ...] = (OnnxRepairError, ConverterError)

__all__ = ["OnnxRepairError", "UsageError", "DataError", "ModelError", "UnsupportedOpsError", "ValidationFailed",
           "ConverterError", "ConverterUsageError", "USER_ERRORS"]
