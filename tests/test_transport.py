"""transport.py's sending side without a process group: what is flattened to be sent. The bytes a
round moves are checked with real processes in test_sweep.py and test_experiment.py."""

from __future__ import annotations

import torch

from fedshard import transport


def test_a_payload_sent_to_several_trainers_is_flattened_once():
    """FedAvg sends every trainer the one model: one 220 MB buffer, not one per trainer."""
    model = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    other = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    flats = transport.flat_payloads([model, model, other, model])
    assert flats[0] is flats[1] is flats[3] and flats[2] is not flats[0]
    assert torch.equal(flats[0], torch.tensor([0.0, 1, 2, 3, 4, 5, 1, 1])) and torch.equal(flats[2], torch.zeros(8))
    assert [transport.nbytes(f) for f in flats] == [32] * 4
