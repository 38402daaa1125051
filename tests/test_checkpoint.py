"""The round checkpoint file: exact weights back, and anything incomplete or foreign refused."""

from __future__ import annotations

import pytest
import torch

from fedshard.core import checkpoint
from fedshard.core.models.alexnet import AlexNet


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(7)
    return AlexNet().state_dict()


def test_round_trip_is_exact(tmp_path, weights):
    path = checkpoint.save(checkpoint.Checkpoint(7, weights, {"test_loss": 1.25}), tmp_path / checkpoint.file_name(7))
    back = checkpoint.load(path, "alexnet")
    assert back.round == 7 and back.metrics == {"test_loss": 1.25}
    assert back.weights.keys() == weights.keys()
    assert all(torch.equal(back.weights[k], weights[k]) and back.weights[k].dtype == torch.float32 for k in weights)


def test_names_sort_by_round_and_say_it():
    assert checkpoint.file_name(7) == "round-00007.pt"
    assert checkpoint.round_of("checkpoint/round-00012.pt") == 12
    assert checkpoint.round_of("round-00012.pt.tmp") is None and checkpoint.round_of("weights.pt") is None
    assert sorted(checkpoint.file_name(r) for r in (10, 9, 100)) == [checkpoint.file_name(r) for r in (9, 10, 100)]


def test_a_torn_file_is_refused(tmp_path, weights):
    path = checkpoint.save(checkpoint.Checkpoint(3, weights), tmp_path / "round-00003.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as by a crash mid-write
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.load(path, "alexnet")


def test_other_files_are_refused(tmp_path, weights):
    foreign = tmp_path / "other.pt"
    torch.save(dict(weights), foreign)  # a bare state dict is no checkpoint
    with pytest.raises(checkpoint.CheckpointError, match="not a fedshard checkpoint"):
        checkpoint.load(foreign, "alexnet")
    sliced = checkpoint.save(checkpoint.Checkpoint(1, AlexNet({"conv1": 48}).state_dict()), tmp_path / "s.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not those of the full AlexNet"):
        checkpoint.load(sliced, "alexnet")
