"""The ONNX-to-ONNX gradient pass (see :mod:`onnxsal.autodiff.pass_` for the phases and
:mod:`onnxsal.autodiff.contract` for the contract of the augmented model)."""

from .contract import META_GRAD, META_INPUT, META_LOGITS, META_RULES, META_SEED, META_VALUE, augmented_roles
from .pass_ import augment
from .rules.registry import supported_ops

__all__ = ["augment", "augmented_roles", "supported_ops", "META_SEED", "META_LOGITS", "META_GRAD",
           "META_VALUE", "META_RULES", "META_INPUT"]
