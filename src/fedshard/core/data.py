"""CIFAR-100 on disk: finding, downloading, validating, reading and partitioning.

Everything that touches the dataset files lives here. The official
`cifar-100-python` files are pickles, so they are read with an unpickler that
can rebuild numpy arrays and nothing else: a foreign or tampered file fails
with a DataError instead of running code. Every problem a user can fix
(missing, truncated or foreign files, no network) is a DataError whose message
names the path and what to do.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import pathlib
import pickle
from contextlib import suppress
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from numpy._core import multiarray as _multiarray

from fedshard.core.config import PARTITIONS
from fedshard.core.errors import FedshardError, described
from fedshard.core.files import write_atomic
from fedshard.core.models import NUM_CLASSES

log = logging.getLogger(__name__)

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"

DATASET_DIR = "cifar-100-python"
SPLITS = ("train", "test")
# The files of the official layout (meta: the class names, which fedshard does not read but an
# intact copy of the data set has).
DATASET_FILES = (*SPLITS, "meta")
IMAGE_SHAPE = (3, 32, 32)
ROW_LENGTH = 3 * 32 * 32
# A Dirichlet draw with small alpha can starve a part; redraw this many times
# before telling the user to pick fewer parts or a larger alpha.
DIRICHLET_ATTEMPTS = 100

# The only globals a CIFAR-100 pickle needs: numpy's array and scalar
# reconstruction (under its numpy 1.x and 2.x module names) and the codec that
# protocol-2 pickles use for bytes. They map straight to the objects, so no
# module is ever imported on behalf of a file.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


def download_and_extract_archive(*args, **kwargs):
    """torchvision's downloader, imported only when a download is needed: importing
    torchvision costs every trainer over a second of startup."""
    from torchvision.datasets.utils import download_and_extract_archive as download

    return download(*args, **kwargs)


class DataError(FedshardError):
    """A user-facing problem with the dataset; message names the path and what to do."""

    exit_code = 2


# --- finding and downloading -------------------------------------------------


def ensure_cifar100(data_dir: str | os.PathLike[str], download: bool = True) -> pathlib.Path:
    """Return data_dir/cifar-100-python, downloading and extracting it when the whole set is missing
    (saying so on stderr). Some of its files without the others is a
    DataError naming the missing ones: a download would replace files that are there."""
    data_dir = pathlib.Path(data_dir)
    root = data_dir / DATASET_DIR
    present = [name for name in DATASET_FILES if (root / name).is_file()]
    if len(present) == len(DATASET_FILES):
        return root
    if present:
        missing = [name for name in DATASET_FILES if name not in present]
        raise DataError(
            f"CIFAR-100 in {root} is incomplete: no file {', '.join(missing)} (there: "
            f"{', '.join(present)}). Restore it from {CIFAR100_ARCHIVE} ({CIFAR100_URL}, md5 "
            f"{CIFAR100_MD5}), or remove {root} to download the whole set again."
        )
    if not download:
        raise DataError(_missing_message(data_dir, "it is missing and downloading is disabled"))
    archive = data_dir / CIFAR100_ARCHIVE
    _say(
        f"CIFAR-100 is not in {root}: "
        + (
            f"extracting {archive} (downloaded again if its md5 is not {CIFAR100_MD5})"
            if archive.is_file()
            else f"downloading {CIFAR100_URL} (about 170 MB) into {data_dir} and extracting it"
        )
    )
    try:
        # Reuses an archive already in data_dir when its md5 matches, so an
        # offline machine only needs the archive copied there.
        download_and_extract_archive(CIFAR100_URL, str(data_dir), filename=CIFAR100_ARCHIVE, md5=CIFAR100_MD5)
    except Exception as exc:  # any failure (network, md5, disk, tar) has the same remedy
        raise DataError(_missing_message(data_dir, f"download failed: {described(exc)}")) from exc
    if not _is_complete(root):
        raise DataError(_missing_message(data_dir, f"the archive did not contain {DATASET_DIR}/{{train,test,meta}}"))
    return root


def _is_complete(root: pathlib.Path) -> bool:
    return all((root / name).is_file() for name in DATASET_FILES)


def _say(message: str) -> None:
    log.warning(f"fedshard: {message}")  # on stderr, as what fedshard does on its own (core/log.py)


def _missing_message(data_dir: pathlib.Path, reason: str) -> str:
    return (
        f"CIFAR-100 not found in {data_dir}: {reason}. "
        f"Place {CIFAR100_ARCHIVE} (from {CIFAR100_URL}, md5 {CIFAR100_MD5}) in {data_dir}, "
        f"or extract it there so that {data_dir / DATASET_DIR}/{{train,test,meta}} exist."
    )


# --- reading and validating --------------------------------------------------


def load_split(data_dir: str | os.PathLike[str], split: str, max_samples: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 3, 32, 32) and fine labels int64 (N,) of one split.

    max_samples > 0 keeps only the first max_samples images.
    """
    if split not in SPLITS:
        raise DataError(f"unknown CIFAR-100 split {split!r}: expected one of {SPLITS}")
    if max_samples < 0:
        raise ValueError(f"max_samples must be >= 0 (0 means all), got {max_samples}")
    path = ensure_cifar100(data_dir, download=True) / split
    data, labels = _validated(_read_pickle(path), path)
    if max_samples:
        data, labels = data[:max_samples], labels[:max_samples]
    # Each official row is 1024 red, then 1024 green, then 1024 blue values,
    # each plane row-major 32x32: exactly a C-order (3, 32, 32) image.
    images = np.ascontiguousarray(data.reshape(-1, *IMAGE_SHAPE))
    return images, labels.astype(np.int64)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only _ALLOWED_GLOBALS and refuses every other global."""

    def __init__(self, file: BinaryIO, path: pathlib.Path):
        # latin1 turns Python 2 str (keys and array buffers) into what numpy expects.
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path}: refused to load global {module}.{name}; {_invalid_hint(self._path)}"
            ) from None


def _read_pickle(path: pathlib.Path) -> object:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read {path}: {described(exc)}") from exc
    except Exception as exc:  # truncated or foreign files fail in many ways
        raise DataError(f"{path}: {described(exc)}; {_invalid_hint(path)}") from exc


def _validated(batch: object, path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """The (data, labels) arrays of a split file, or a DataError saying what is wrong."""

    def fail(problem: str) -> DataError:
        return DataError(f"{path}: {problem}; {_invalid_hint(path)}")

    if not isinstance(batch, dict):
        raise fail(f"top level is {type(batch).__name__}, not dict")
    # The original Python 2 files give str keys; re-pickled ones may give bytes.
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [key for key in ("data", "fine_labels") if key not in batch]
    if missing:
        raise fail(f"missing key(s) {missing}")
    data = batch["data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == ROW_LENGTH):
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise fail(f"data is {found}, expected uint8 array of shape (N, {ROW_LENGTH})")
    labels = np.asarray(batch["fine_labels"])
    if labels.shape != (len(data),):
        raise fail(f"fine_labels has shape {labels.shape}, expected ({len(data)},) to match data")
    if labels.size and labels.dtype.kind not in "iu":
        raise fail(f"fine_labels are {labels.dtype}, expected integers")
    if labels.size and not (0 <= labels.min() and labels.max() < NUM_CLASSES):
        raise fail(f"fine_labels span {labels.min()}..{labels.max()}, expected 0..{NUM_CLASSES - 1}")
    return data, labels


def _invalid_hint(path: pathlib.Path) -> str:
    return (
        f"it is not a valid CIFAR-100 python file. Delete {path.parent} "
        f"(and any {CIFAR100_ARCHIVE} beside it) to re-download the dataset."
    )


# --- partitioning ------------------------------------------------------------


def partition(labels: np.ndarray, n: int, scheme: str = "iid", seed: int = 0, alpha: float = 0.5) -> list[np.ndarray]:
    """Split the indices of labels into n disjoint, non-empty, sorted int64 parts. iid and dirichlet
    cover every index; contiguous, as the original harness, leaves out the last N mod n."""
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}: expected one of {PARTITIONS}")
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if n < 1:
        raise ValueError(f"number of parts must be >= 1, got {n}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if len(labels) < n:
        raise _unsplittable(len(labels), n, scheme, alpha)
    parts = _SCHEMES[scheme](labels, n, np.random.default_rng(seed), alpha)
    if any(p.size == 0 for p in parts):
        raise _unsplittable(len(labels), n, scheme, alpha)
    return [np.sort(p).astype(np.int64) for p in parts]


def _iid(labels, n, rng, alpha):
    return np.array_split(rng.permutation(len(labels)), n)


def _contiguous(labels, n, rng, alpha):
    """Trainer k gets images k*(N//n) .. (k+1)*(N//n) - 1, exactly as the original harness shards
    them: equal shards, and the last N mod n images (none for 50,000 and n = 1, 2, 4, 8) unused."""
    share = len(labels) // n
    return [np.arange(k * share, (k + 1) * share) for k in range(n)]


def _dirichlet(labels, n, rng, alpha):
    """Per class, share its samples among the parts in Dirichlet(alpha) proportions."""
    for _ in range(DIRICHLET_ATTEMPTS):
        chunks: list[list[np.ndarray]] = [[] for _ in range(n)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha)))[:-1] * len(members)).astype(int)
            for part, chunk in zip(chunks, np.split(members, cuts)):
                part.append(chunk)
        parts = [np.concatenate(part) for part in chunks]
        if all(p.size for p in parts):
            break
    return parts


_SCHEMES = {"iid": _iid, "contiguous": _contiguous, "dirichlet": _dirichlet}
assert tuple(_SCHEMES) == PARTITIONS, "config.PARTITIONS names the schemes here, in their order"


def _unsplittable(size: int, n: int, scheme: str, alpha: float) -> DataError:
    remedy = f"alpha={alpha}: use fewer parts or a larger alpha" if scheme == "dirichlet" else "use fewer parts"
    return DataError(f"cannot split N={size} samples into n={n} non-empty parts with the {scheme!r} scheme ({remedy})")


# --- what an experiment reads, for the record -----------------------------------


@dataclass(frozen=True)
class DatasetInput:
    """One data set an experiment uses, as its MLflow run records it (a dataset input)."""

    name: str
    context: str  # "training" or "evaluation"
    digest: str  # of the file's bytes and, for a partition, of the images it holds
    source: str  # the file it is read from
    images: int
    profile: dict


def file_digest(path: pathlib.Path) -> str:
    """md5 of a file's bytes, as the CIFAR-100 archive is published with."""
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    return md5.hexdigest()


def digest_cache_file() -> pathlib.Path:
    """$XDG_CACHE_HOME/fedshard/digests.json (~/.cache by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fedshard" / "digests.json"


def cached_digest(path: pathlib.Path) -> str:
    """file_digest, remembered by path, size and modification time: every experiment records the
    digests of the 150 MB it reads, and hashing them cost each start-up about a second. A file
    that changes gets a new size or mtime, so a new digest; a cache that cannot be read or
    written only costs the hashing."""
    stat, key = path.stat(), str(path.resolve())
    cache_file = digest_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key) if isinstance(cache, dict) else None
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["md5"])
    digest = file_digest(path)
    cache = {
        **(cache if isinstance(cache, dict) else {}),
        key: {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": digest},
    }
    with suppress(OSError):
        write_atomic(cache_file, json.dumps(cache, indent=1, sort_keys=True).encode())
    return digest


def inputs(
    data_dir: str | os.PathLike[str],
    parts: list[np.ndarray],
    test_images: int,
    partition: str,
    seed: int,
    max_train_samples: int = 0,
    max_test_samples: int = 0,
) -> list[DatasetInput]:
    """The test set (evaluation) and each trainer's partition (training) of one experiment."""
    root = ensure_cifar100(data_dir, download=False)
    train_md5, test_md5 = cached_digest(root / "train"), cached_digest(root / "test")
    out = [
        DatasetInput(
            "cifar100-test",
            "evaluation",
            test_md5[:12],
            str(root / "test"),
            test_images,
            {"num_rows": test_images, "file_md5": test_md5, "max_samples": max_test_samples},
        )
    ]
    for k, part in enumerate(parts):
        digest = hashlib.sha256(train_md5.encode() + np.ascontiguousarray(part, np.int64).tobytes()).hexdigest()
        name = "cifar100-train" if len(parts) == 1 else f"cifar100-train-part{k}of{len(parts)}"
        out.append(
            DatasetInput(
                name,
                "training",
                digest[:12],
                str(root / "train"),
                len(part),
                {
                    "num_rows": len(part),
                    "trainer": k,
                    "trainers": len(parts),
                    "partition": partition,
                    "seed": seed,
                    "file_md5": train_md5,
                    "max_samples": max_train_samples,
                },
            )
        )
    return out
