"""Export: Keras model -> TFLite float32 / int8 and ONNX, each proven against Keras. Needs TensorFlow."""
