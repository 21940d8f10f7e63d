"""The one exception family a user can cause.

Every error that comes from the user's input (a model file, an image, an option) is an
:class:`OnnxsalError`. Its message is one line that says what was found, where, and what to do.
The CLI prints that line and exits non-zero; anything else is a bug in onnxsal.
"""

from __future__ import annotations


class OnnxsalError(Exception):
    """Base class of every error a user can cause."""


class ModelError(OnnxsalError):
    """The model file is unreadable, invalid, hostile or not an image classifier."""


class UnsupportedOperatorError(ModelError):
    """The gradient pass met operators it has no rule for."""

    def __init__(self, unsupported: dict[str, list[str]]):
        self.unsupported = dict(sorted(unsupported.items()))
        parts = []
        for op, nodes in self.unsupported.items():
            shown = ", ".join(nodes[:5]) + (f", ... ({len(nodes)} nodes)" if len(nodes) > 5 else "")
            parts.append(f"{op} (nodes: {shown})")
        super().__init__(
            "cannot differentiate the model: no gradient rule for " + "; ".join(parts)
        )


class InputError(OnnxsalError):
    """An image, array or data set cannot be used as input."""


class OptionError(OnnxsalError):
    """An option has a value that cannot work."""


class OutputError(OnnxsalError):
    """The output folder cannot take the results (a file, read-only, full)."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception text (onnx and onnxruntime write pages), or its
    type's name when it says nothing: the detail of a one-line OnnxsalError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
