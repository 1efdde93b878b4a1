"""Training: Keras 3 APIs only, so it runs under KERAS_BACKEND=tensorflow, jax or torch."""
