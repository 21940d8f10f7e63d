"""Convert Keras 3 / tf.keras image classifiers to ONNX for onnxsal."""
