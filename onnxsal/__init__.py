"""onnxsal: saliency maps for any ONNX image classifier, computed by onnxruntime."""

__version__ = "0.1.0"


def code_fingerprint() -> str:
    """SHA-256 of onnxsal's own source files: part of every resume key, so that results
    computed by other code (an upgrade, a fix) are recomputed rather than reused."""
    global _CODE_FINGERPRINT
    if _CODE_FINGERPRINT is None:
        import hashlib
        from pathlib import Path

        h = hashlib.sha256(__version__.encode())
        root = Path(__file__).resolve().parent
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
        _CODE_FINGERPRINT = h.hexdigest()
    return _CODE_FINGERPRINT


_CODE_FINGERPRINT: str | None = None
