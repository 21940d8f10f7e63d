"""Convert JAX/flax image classifiers to ONNX for onnxsal (via jax2onnx)."""
