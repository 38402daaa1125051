"""transport.py's sending side without a process group: what is flattened to be sent. The bytes a
round moves are checked with real processes in test_sweep.py and test_experiment.py."""

from __future__ import annotations

import torch

from fedshard.runtime import transport


def test_a_payload_sent_to_several_trainers_is_flattened_once():
    """FedAvg sends every trainer the one model: one 220 MB buffer, not one per trainer."""
    model = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    other = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    flats = transport.flat_payloads([model, model, other, model])
    assert flats[0] is flats[1] is flats[3] and flats[2] is not flats[0]
    # In packing_order (by name): b, then w.
    assert torch.equal(flats[0], torch.tensor([1.0, 1, 0, 1, 2, 3, 4, 5])) and torch.equal(flats[2], torch.zeros(8))
    assert [transport.nbytes(f) for f in flats] == [32] * 4


def test_both_sides_pack_by_name_whatever_order_their_state_dicts_have():
    """The aggregator packs what the strategy split, the trainer what its model holds: `pack` and
    `unpack` order both by name, so neither relies on the other building its dict in one order."""
    sent = {"conv.weight": torch.arange(4.0), "bn.num_batches_tracked": torch.tensor(3), "bn.bias": torch.ones(2)}
    trainers_own = {name: torch.zeros_like(t) for name, t in reversed(list(sent.items()))}
    back = transport.unpack(transport.pack(sent), trainers_own)
    assert list(back) == transport.packing_order(sent) == sorted(sent)
    assert all(torch.equal(back[k], sent[k]) and back[k].dtype == sent[k].dtype for k in sent)
    assert transport.packed_words(sent) == transport.pack(sent).numel() == 4 + 2 + 2  # the int64 as two words
