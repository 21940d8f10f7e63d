"""The ONNX-to-ONNX gradient pass (see :mod:`onnxsal.autodiff.pass_` for the contract)."""

from .pass_ import (META_GRAD, META_INPUT, META_LOGITS, META_RULES, META_SEED, META_VALUE,
                    augment, augmented_roles)
from .rules.registry import supported_ops

__all__ = ["augment", "augmented_roles", "supported_ops", "META_SEED", "META_LOGITS", "META_GRAD",
           "META_VALUE", "META_RULES", "META_INPUT"]
