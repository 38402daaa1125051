"""fedshard.core.data: reading, validating, downloading and partitioning CIFAR-100."""

import hashlib
import os
import pathlib
import pickle
import re
import shutil
import struct
import tarfile
import urllib.error

import numpy as np
import pytest

import fedshard.core.data as data
from fedshard.core.data import DataError, ensure_cifar100, load_split, partition
from fedshard.core.synthetic import write_synthetic_cifar100


def _write_train(tmp_path, obj, protocol=4):
    """A synthetic data set whose train file is replaced by obj, pickled."""
    root = write_synthetic_cifar100(tmp_path, n_train=8, n_test=8)
    with open(root / "train", "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return root / "train"


def _batch(rows, labels):
    return {"data": np.asarray(rows, dtype=np.uint8), "fine_labels": list(labels)}


# --- synthetic round trip ------------------------------------------------------


def test_synthetic_round_trip(tmp_path):
    write_synthetic_cifar100(tmp_path, n_train=40, n_test=20, n_classes=4)
    images, labels = load_split(tmp_path, "train")
    assert images.shape == (40, 3, 32, 32) and images.dtype == np.uint8 and images.flags.c_contiguous
    assert labels.shape == (40,) and labels.dtype == np.int64
    assert set(labels.tolist()) == {0, 25, 50, 75}
    test_images, test_labels = load_split(tmp_path, "test")
    assert test_images.shape == (20, 3, 32, 32) and test_labels.shape == (20,)
    first, first_labels = load_split(tmp_path, "train", max_samples=7)
    assert first.shape == (7, 3, 32, 32) and first.flags.c_contiguous
    np.testing.assert_array_equal(first, images[:7])
    np.testing.assert_array_equal(first_labels, labels[:7])


def test_synthetic_files_match_the_official_format(tmp_path):
    root = write_synthetic_cifar100(tmp_path, n_train=10, n_test=5)
    with open(root / "train", "rb") as f:
        train = pickle.load(f)
    assert set(train) == {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
    assert train["data"].shape == (10, 3072) and train["data"].dtype == np.uint8
    assert all(type(x) is int for x in train["fine_labels"])
    assert train["coarse_labels"] == [x // 5 for x in train["fine_labels"]]
    with open(root / "meta", "rb") as f:
        meta = pickle.load(f)
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20
    assert not [p for p in os.listdir(root) if p.endswith(".tmp")]


def test_synthetic_is_deterministic_and_separable_by_colour(tmp_path):
    write_synthetic_cifar100(tmp_path / "a", seed=3)
    write_synthetic_cifar100(tmp_path / "b", seed=3)
    write_synthetic_cifar100(tmp_path / "c", seed=4)
    train, train_labels = load_split(tmp_path / "a", "train")
    np.testing.assert_array_equal(train, load_split(tmp_path / "b", "train")[0])
    assert not np.array_equal(train, load_split(tmp_path / "c", "train")[0])
    # The class signal is the mean colour: a nearest-mean classifier on it is perfect.
    classes = np.unique(train_labels)
    means = np.stack([train[train_labels == c].mean(axis=(0, 2, 3)) for c in classes])
    test, test_labels = load_split(tmp_path / "a", "test")
    distances = np.linalg.norm(test.mean(axis=(2, 3))[:, None, :] - means[None], axis=2)
    np.testing.assert_array_equal(classes[distances.argmin(axis=1)], test_labels)


# --- official layout and pickle flavours -----------------------------------------


def test_official_row_layout_is_red_then_green_then_blue_row_major(tmp_path):
    plane = np.arange(1024).reshape(32, 32)
    red, green, blue = plane % 251, plane.T % 241, (plane * 7) % 256
    row = np.concatenate([red.ravel(), green.ravel(), blue.ravel()])
    _write_train(tmp_path, _batch([row], [42]))
    images, labels = load_split(tmp_path, "train")
    np.testing.assert_array_equal(images[0, 0], red)
    np.testing.assert_array_equal(images[0, 1], green)
    np.testing.assert_array_equal(images[0, 2], blue)
    assert labels.tolist() == [42]


def _python2_pickle(rows, labels):
    """A pickle as Python 2 with numpy 1.x wrote the official files: str keys
    as BINSTRING and the array's buffer as a Python 2 str, which only the
    latin1 decoding turns back into the right bytes."""

    def text(value):  # SHORT_BINSTRING
        return b"U" + bytes([len(value)]) + value

    def integer(value):  # BININT
        return b"J" + struct.pack("<i", value)

    dtype = b"cnumpy\ndtype\n" + text(b"u1") + integer(0) + integer(1) + b"\x87R"
    dtype += b"(" + integer(3) + text(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + text(b"b") + b"\x87R"
    array += b"(" + integer(1) + integer(rows.shape[0]) + integer(rows.shape[1]) + b"\x86" + dtype + b"\x89"
    array += b"T" + struct.pack("<i", rows.nbytes) + rows.tobytes() + b"tb"
    fine_labels = b"](" + b"".join(integer(x) for x in labels) + b"e"
    return b"\x80\x02}(" + text(b"data") + array + text(b"fine_labels") + fine_labels + b"u."


def test_original_python2_pickle_is_read(tmp_path):
    rows = np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8)  # every byte value, > 127 included
    root = write_synthetic_cifar100(tmp_path, n_train=4, n_test=4)
    (root / "train").write_bytes(_python2_pickle(rows, [7, 99]))
    images, labels = load_split(tmp_path, "train")
    np.testing.assert_array_equal(images, rows.reshape(2, 3, 32, 32))
    assert labels.tolist() == [7, 99]


def test_python2_style_pickle_with_bytes_keys_is_accepted(tmp_path):
    rows = np.full((3, 3072), 9, dtype=np.uint8)
    obj = {b"data": rows, b"fine_labels": [1, 2, 99], b"batch_label": b"training batch 1 of 1"}
    _write_train(tmp_path, obj, protocol=2)
    images, labels = load_split(tmp_path, "train")
    assert images.shape == (3, 3, 32, 32) and (images == 9).all()
    assert labels.tolist() == [1, 2, 99]


class _Payload:
    """Pickles as a call of `func(arg)`: what a malicious file would do."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


class Gadget:
    pass


def test_restricted_unpickler_refuses_os_system_without_running_it(tmp_path):
    sentinel = tmp_path / "pwned"
    obj = {"data": np.zeros((1, 3072), np.uint8), "fine_labels": [0], "x": _Payload(os.system, f"touch {sentinel}")}
    path = _write_train(tmp_path, obj)
    with pytest.raises(DataError, match=r"system") as err:
        load_split(tmp_path, "train")
    assert str(path) in str(err.value)
    assert f"{os.system.__module__}.system" in str(err.value)
    assert not sentinel.exists()


def test_restricted_unpickler_refuses_a_custom_class(tmp_path):
    path = _write_train(tmp_path, {"data": Gadget(), "fine_labels": []})
    with pytest.raises(DataError, match=r"refused to load global \S*Gadget") as err:
        load_split(tmp_path, "train")
    assert str(path) in str(err.value)


def test_truncated_file_names_the_file(tmp_path):
    root = write_synthetic_cifar100(tmp_path, n_train=16, n_test=8)
    content = (root / "train").read_bytes()
    (root / "train").write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match="not a valid CIFAR-100 python file") as err:
        load_split(tmp_path, "train")
    assert str(root / "train") in str(err.value)


def test_foreign_file_is_refused(tmp_path):
    root = write_synthetic_cifar100(tmp_path, n_train=4, n_test=4)
    (root / "test").write_text("<html>404 not found</html>\n")
    with pytest.raises(DataError, match="not a valid CIFAR-100 python file"):
        load_split(tmp_path, "test")


@pytest.mark.parametrize(
    "obj, problem",
    [
        (_batch(np.zeros((2, 3072)), [0, 100]), "fine_labels span"),
        (_batch(np.zeros((2, 3072)), [-1, 0]), "fine_labels span"),
        (_batch(np.zeros((2, 3072)), [0]), "fine_labels has shape"),
        (_batch(np.zeros((2, 3072)), [0.5, 1.0]), "expected integers"),
        (_batch(np.zeros((2, 3071)), [0, 1]), "expected uint8 array of shape"),
        ({"data": np.zeros((2, 3072), np.float32), "fine_labels": [0, 1]}, "expected uint8"),
        ({"data": np.zeros((2, 3072), np.uint8)}, "missing key"),
        ([1, 2, 3], "top level is list"),
    ],
)
def test_invalid_contents_are_refused(tmp_path, obj, problem):
    path = _write_train(tmp_path, obj)
    with pytest.raises(DataError, match=problem) as err:
        load_split(tmp_path, "train")
    assert str(path) in str(err.value)


def test_unknown_split_is_refused(tmp_path):
    write_synthetic_cifar100(tmp_path, n_train=4, n_test=4)
    with pytest.raises(DataError, match="validation"):
        load_split(tmp_path, "validation")


# --- finding and downloading -----------------------------------------------------


def test_missing_dataset_without_download_names_directory_and_archive(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        ensure_cifar100(missing, download=False)
    message = str(err.value)
    assert str(missing) in message and "cifar-100-python.tar.gz" in message and data.CIFAR100_MD5 in message


def test_an_incomplete_dataset_names_the_missing_file_and_downloads_nothing(tmp_path, monkeypatch):
    root = write_synthetic_cifar100(tmp_path, n_train=4, n_test=4)
    (root / "meta").unlink()
    monkeypatch.setattr(data, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    for download in (True, False):
        with pytest.raises(DataError) as err:
            ensure_cifar100(tmp_path, download=download)
        assert str(err.value).startswith(f"CIFAR-100 in {root} is incomplete: no file meta (there: train, test). ")
        assert f"remove {root} to download the whole set again" in str(err.value)


def test_a_download_says_what_it_does(tmp_path, monkeypatch, capsys):
    source = write_synthetic_cifar100(tmp_path / "source", n_train=4, n_test=4)
    monkeypatch.setattr(
        data,
        "download_and_extract_archive",
        lambda url, where, **_: shutil.copytree(source, pathlib.Path(where) / "cifar-100-python"),
    )
    assert ensure_cifar100(tmp_path / "data") == tmp_path / "data" / "cifar-100-python"
    assert capsys.readouterr().err == (
        f"fedshard: CIFAR-100 is not in {tmp_path / 'data' / 'cifar-100-python'}: "
        f"downloading {data.CIFAR100_URL} (about 170 MB) into {tmp_path / 'data'} "
        "and extracting it\n"
    )


@pytest.mark.parametrize(
    "failure",
    [
        urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
        RuntimeError("File not found or corrupted."),  # what torchvision raises on a bad md5
    ],
)
def test_failed_download_gives_one_line_data_error(tmp_path, monkeypatch, failure):
    def download(*args, **kwargs):
        raise failure

    monkeypatch.setattr(data, "download_and_extract_archive", download)
    with pytest.raises(DataError, match=re.escape(failure.args[0])) as err:
        load_split(tmp_path, "train")
    message = str(err.value)
    assert str(tmp_path) in message and "cifar-100-python.tar.gz" in message and "\n" not in message


def test_archive_placed_in_data_dir_is_extracted_without_network(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_synthetic_cifar100(source, n_train=12, n_test=6)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = data_dir / data.CIFAR100_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-100-python", arcname="cifar-100-python")
    monkeypatch.setattr(data, "CIFAR100_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "CIFAR100_URL", "http://127.0.0.1:9/x.tar.gz")
    root = ensure_cifar100(data_dir)
    assert root == data_dir / "cifar-100-python"
    images, _ = load_split(data_dir, "train")
    np.testing.assert_array_equal(images, load_split(source, "train")[0])


def test_archive_with_wrong_md5_is_not_trusted(tmp_path, monkeypatch):
    (tmp_path / data.CIFAR100_ARCHIVE).write_bytes(b"not really a tarball")
    monkeypatch.setattr(data, "CIFAR100_URL", "http://127.0.0.1:9/x.tar.gz")
    with pytest.raises(DataError, match="download failed"):
        ensure_cifar100(tmp_path)
    assert not (tmp_path / "cifar-100-python").exists()


# --- partitions ------------------------------------------------------------------


def _check_cover(parts, size):
    joined = np.concatenate(parts)
    assert all(p.dtype == np.int64 and p.size > 0 and (np.diff(p) > 0).all() for p in parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(size))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_partitions_are_disjoint_and_cover_every_index(scheme, n):
    labels = np.arange(1000) % 10
    parts = partition(labels, n, scheme, seed=1)
    assert len(parts) == n
    _check_cover(parts, len(labels))


@pytest.mark.parametrize("scheme", data.PARTITIONS)
def test_partitions_are_deterministic_per_seed(scheme):
    labels = np.arange(600) % 6
    same = [partition(labels, 3, scheme, seed=5) for _ in range(2)]
    for a, b in zip(*same):
        np.testing.assert_array_equal(a, b)
    if scheme != "contiguous":
        other = partition(labels, 3, scheme, seed=6)
        assert any(not np.array_equal(a, b) for a, b in zip(same[0], other))


def test_iid_parts_are_near_equal_and_shuffled():
    parts = partition(np.zeros(1003, dtype=int), 4, "iid", seed=0)
    assert sorted(len(p) for p in parts) == [250, 251, 251, 251]
    assert not np.array_equal(parts[0], np.arange(len(parts[0])))


def test_contiguous_parts_are_the_harness_shards():
    # The original harness: trainer k gets images k*(N//n) .. (k+1)*(N//n) - 1; the last N mod n are unused.
    parts = partition(np.zeros(10, dtype=int), 3, "contiguous")
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    full = partition(np.zeros(50_000, dtype=int), 8, "contiguous")
    assert [(int(p[0]), int(p[-1])) for p in full] == [(k * 6250, k * 6250 + 6249) for k in range(8)]
    np.testing.assert_array_equal(np.concatenate(partition(np.zeros(1000), 7, "contiguous")), np.arange(994))


def test_dirichlet_small_alpha_skews_labels_and_keeps_parts_non_empty():
    labels = np.repeat(np.arange(10), 100)

    def mean_top_class_share(parts):
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    skewed = partition(labels, 4, "dirichlet", seed=0, alpha=0.05)
    _check_cover(skewed, len(labels))
    assert mean_top_class_share(skewed) > 0.4
    assert mean_top_class_share(partition(labels, 4, "iid", seed=0)) < 0.2


def test_dirichlet_redraws_when_a_draw_leaves_a_part_empty():
    # About half of single draws leave one of the 4 parts empty here.
    labels = np.arange(20) % 2
    for seed in range(10):
        _check_cover(partition(labels, 4, "dirichlet", seed=seed, alpha=0.3), len(labels))


def test_dirichlet_that_cannot_fill_every_part_raises():
    with pytest.raises(DataError, match=r"n=5.*N=5|N=5.*n=5"):
        partition(np.zeros(5, dtype=int), 5, "dirichlet", alpha=0.01)


@pytest.mark.parametrize("scheme", data.PARTITIONS)
def test_more_parts_than_samples_raises(scheme):
    with pytest.raises(DataError) as err:
        partition(np.zeros(3, dtype=int), 4, scheme)
    assert "N=3" in str(err.value) and "n=4" in str(err.value) and scheme in str(err.value)


def test_unknown_scheme_and_bad_alpha_raise_value_error():
    with pytest.raises(ValueError, match="shards.*iid.*contiguous.*dirichlet"):
        partition(np.zeros(10, dtype=int), 2, "shards")
    with pytest.raises(ValueError, match="alpha"):
        partition(np.zeros(10, dtype=int), 2, "dirichlet", alpha=0.0)


def test_dataset_digests_are_hashed_once_per_file_version(tmp_path, monkeypatch):
    """Each experiment records the digests of the files it reads; an unchanged file is not hashed
    again (150 MB cost every start-up about a second), a changed one is."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "train"
    path.write_bytes(b"x" * 1000)
    hashed = []
    real = data.file_digest
    monkeypatch.setattr(data, "file_digest", lambda p: hashed.append(p) or real(p))
    first = data.cached_digest(path)
    assert first == hashlib.md5(b"x" * 1000).hexdigest() and len(hashed) == 1
    assert data.cached_digest(path) == first and len(hashed) == 1  # from the cache
    assert (tmp_path / "cache" / "fedshard" / "digests.json").is_file()
    path.write_bytes(b"y" * 1001)  # another version of the file: another size and mtime
    assert data.cached_digest(path) == hashlib.md5(b"y" * 1001).hexdigest() and len(hashed) == 2
    (tmp_path / "cache" / "fedshard" / "digests.json").write_text("{not json")  # a broken cache costs a hash
    assert data.cached_digest(path) == hashlib.md5(b"y" * 1001).hexdigest() and len(hashed) == 3
