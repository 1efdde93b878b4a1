"""The TensorFlow-free part that runs on the device: numpy, Pillow, click and one runtime."""
