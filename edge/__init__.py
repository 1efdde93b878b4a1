"""xray-edge: a Keras chest X-ray classifier from training to a Raspberry Pi."""

__version__ = "0.1.0"
