"""Text from files shown to people: terminal output, figure titles, Markdown, file names.

Model files and image names are untrusted: a producer name, a label or a node name may hold
control characters (an ANSI escape can clear the screen or fake output) or bytes that are not
UTF-8 (file names decoded with ``surrogateescape``). :func:`printable` is the one place that
turns such a string into visible, valid text; :func:`file_stem` makes a safe, short file name.
"""

from __future__ import annotations

import hashlib
import re

# C0 and C1 control characters (ESC starts every ANSI sequence), DEL, and the Unicode
# direction overrides and isolates that reorder what follows them on screen
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(text: object, keep_newlines: bool = False) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``) and undecodable bytes of a
    file name as ``\\xff``; newlines are kept only with ``keep_newlines`` (onnxsal's own)."""
    s = str(text)
    try:
        s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    if keep_newlines:
        return "\n".join(_CONTROL.sub(_escape, line) for line in s.split("\n"))
    return _CONTROL.sub(_escape, s)


# a file name is at most 255 bytes on common file systems; leave room for suffixes such as
# ".png" and the ".<random>.tmp" of an atomic write
MAX_STEM_BYTES = 120


def file_stem(name: str) -> str:
    """A file-name stem for ``name``: letters, digits, ``-_.`` (others become ``_``), at most
    :data:`MAX_STEM_BYTES` bytes; a shortened stem ends in a hash of the full name."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in printable(name)).lstrip(".")
    stem = stem or "image"
    raw = stem.encode("utf-8")
    if len(raw) <= MAX_STEM_BYTES:
        return stem
    digest = hashlib.sha256(printable(name).encode("utf-8")).hexdigest()[:12]
    return raw[:MAX_STEM_BYTES - 13].decode("utf-8", "ignore") + "-" + digest


__all__ = ["printable", "file_stem", "MAX_STEM_BYTES"]
