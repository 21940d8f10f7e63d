"""onnxsal: saliency maps for any ONNX image classifier, computed by onnxruntime."""

__version__ = "0.1.0"
