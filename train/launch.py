"""What `xray-edge train` settles before Keras is imported: the data folders and the Keras backend.

Keras reads KERAS_BACKEND once, at its first import, so the choice is made here and handed to
the command line, which sets it; nothing below imports Keras.
"""

from __future__ import annotations

from pathlib import Path

from xray_edge.train import device

PHANTOM_DIR = Path("data/phantom")

# The recipe's knobs that differ between real films and the phantoms. Real films: the best of the
# recipe study in docs/training.md (robust_b8: contrast/gamma/noise augmentation, blanking of the
# outer band where markers sit, four times as many updates per epoch). Phantoms: the tutorial's,
# so the offline `make train export` is unchanged in time.
REAL_FILMS = {"photometric": 0.3, "border_erase": 0.5, "batch_size": 8}
PHANTOMS = {"photometric": 0.0, "border_erase": 0.0, "batch_size": 32}


def recipe(real_films: bool, **given) -> dict:
    """The knobs of REAL_FILMS/PHANTOMS, each replaced by the value given (None: not given)."""
    defaults = REAL_FILMS if real_films else PHANTOMS
    return {k: v if given.get(k) is None else given[k] for k, v in defaults.items()}


def default_phantoms(per_class: int, folder: Path = PHANTOM_DIR) -> Path:
    """The embedded synthetic set (generated once, offline) when no --data is given."""
    from xray_edge.train.phantom import generate_phantoms

    # 50 test phantoms per class: with validation, 140 parity images, so the int8 gate
    # (at most 1% of decisions flip) is not decided by a single borderline image
    return generate_phantoms(folder, n_train=per_class, n_test=max(2, per_class // 2))


def gpu_answer(saved: str | None) -> device.SmiAnswer:
    """nvidia-smi's answer: the one `make train` saved (so it is asked once per run), else asked now."""
    return (device.read_answer(Path(saved)) if saved else None) or device.query_gpus()


def keras_backend(requested: str | None, environment: str | None, gpus: list) -> str | None:
    """The backend to set in KERAS_BACKEND, or None to leave it.

    requested (--backend) wins; then KERAS_BACKEND; else JAX where it can use a visible GPU.
    """
    return device.choose_backend(requested, environment, gpus, device.jax_cuda_installed())
