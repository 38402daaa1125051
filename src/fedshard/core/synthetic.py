"""A small, learnable stand-in for CIFAR-100, written in the official layout.

Tests, benchmarks and demos cannot download the real data set, so this writes
`cifar-100-python/{train,test,meta}` files that fedshard.core.data reads exactly as
it reads the real ones. Each class is a flat image of its own colour plus
seeded pixel noise: a signal strong enough that an AlexNet leaves chance
within a few dozen optimiser steps, which the real data never allows on a CPU.
"""

from __future__ import annotations

import colorsys
import pathlib
import pickle

import numpy as np

from fedshard.core.data import DATASET_DIR, ROW_LENGTH
from fedshard.core.files import write_atomic
from fedshard.core.models import NUM_CLASSES

NUM_COARSE_CLASSES = 20
# Pixel noise (standard deviation, in 0..255 units): visible, yet far smaller
# than the distance between two class colours.
NOISE_STD = 24.0
# Pickle protocol 4 keeps the files readable by every Python 3 and rebuilds
# arrays through the globals fedshard.core.data allows (protocol 5 would not).
PICKLE_PROTOCOL = 4


def write_synthetic_cifar100(
    data_dir: str | pathlib.Path, n_train: int = 512, n_test: int = 256, n_classes: int = 4, seed: int = 0
) -> pathlib.Path:
    """Write data_dir/cifar-100-python/{train,test,meta}; return that directory."""
    if not 1 <= n_classes <= NUM_CLASSES:
        raise ValueError(f"n_classes must be in 1..{NUM_CLASSES}, got {n_classes}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    root = pathlib.Path(data_dir) / DATASET_DIR
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _write_pickle(root / "train", _split(n_train, n_classes, rng, "train", "training batch 1 of 1"))
    _write_pickle(root / "test", _split(n_test, n_classes, rng, "test", "testing batch 1 of 1"))
    _write_pickle(
        root / "meta",
        {
            "fine_label_names": [f"class_{i:02d}" for i in range(NUM_CLASSES)],
            "coarse_label_names": [f"superclass_{i:02d}" for i in range(NUM_COARSE_CLASSES)],
        },
    )
    return root


def _split(size: int, n_classes: int, rng: np.random.Generator, name: str, batch_label: str) -> dict:
    classes = np.arange(size) % n_classes
    # Spread the classes over 0..99 so that label handling cannot get away
    # with assuming labels are small.
    fine = classes * (NUM_CLASSES // n_classes)
    noise = rng.normal(0.0, NOISE_STD, size=(size, ROW_LENGTH))
    # Repeat each class colour over its channel's 1024-value plane (R, G, B).
    base = np.repeat(_class_colours(n_classes)[classes], ROW_LENGTH // 3, axis=1)
    return {
        "data": np.clip(np.rint(base + noise), 0, 255).astype(np.uint8),
        "fine_labels": fine.tolist(),
        "coarse_labels": (fine // (NUM_CLASSES // NUM_COARSE_CLASSES)).tolist(),
        "filenames": [f"synthetic_{name}_{i:05d}.png" for i in range(size)],
        "batch_label": batch_label,
    }


def _class_colours(n_classes: int) -> np.ndarray:
    """(n_classes, 3) RGB colours with hues evenly spaced round the colour wheel."""
    return np.array([colorsys.hsv_to_rgb(i / n_classes, 0.9, 0.9) for i in range(n_classes)]) * 255.0


def _write_pickle(path: pathlib.Path, obj: object) -> None:
    """Atomically, so a reader never sees a half-written file; readable by everyone, like the real data."""
    write_atomic(path, pickle.dumps(obj, protocol=PICKLE_PROTOCOL), mode=0o644)
