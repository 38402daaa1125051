"""scikit-learn's handwritten digits (1,797 images of 8x8, 10 classes) upscaled to 32x32 colour
images and written in the official CIFAR-100 layout (cifar-100-python/{train,test,meta}): real
images that fedshard reads like CIFAR-100, small enough to learn from on a CPU in minutes.

    python benchmarks/digits.py DATA_DIR            # 80 % training, 20 % test, shuffled with seed 0
    fedshard run --data-dir DATA_DIR --model resnet18 --image-size 32 ...

scikit-learn comes with MLflow (one of its dependencies). Labels are the digits 0-9 themselves.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

from fedshard.core.data import DATASET_DIR
from fedshard.core.files import write_atomic
from fedshard.core.models import NUM_CLASSES


def write_digits(data_dir: Path, test_share: float = 0.2, seed: int = 0) -> tuple[int, int]:
    """Write the files; returns (training images, test images)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 grey levels -> 0..255, each pixel a 4x4 block, the same in all three channels.
    grey = np.kron(digits.images / 16.0 * 255.0, np.ones((4, 4))).round().astype(np.uint8)
    rows = np.repeat(grey[:, None], 3, axis=1).reshape(len(grey), -1)
    order = np.random.default_rng(seed).permutation(len(rows))
    cut = int(len(rows) * (1 - test_share))
    root = data_dir / DATASET_DIR
    root.mkdir(parents=True, exist_ok=True)
    for name, index in (("train", order[:cut]), ("test", order[cut:])):
        batch = {
            "data": rows[index],
            "fine_labels": digits.target[index].tolist(),
            "coarse_labels": digits.target[index].tolist(),
        }
        write_atomic(root / name, pickle.dumps(batch, protocol=4))
    write_atomic(root / "meta", pickle.dumps({"fine_label_names": [str(i) for i in range(NUM_CLASSES)]}, protocol=4))
    return cut, len(rows) - cut


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    args = parser.parse_args(argv)
    train, test = write_digits(args.data_dir)
    print(f"{train} training and {test} test images in {args.data_dir / DATASET_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
