"""Slicing, assembly, rotation and the two strategies, on AlexNet: pure math checked against numpy
(every model's slicing table: tests/test_models.py)."""

import numpy as np
import pytest
import torch

from fedshard.core import models, sharding, strategies
from fedshard.core.config import ExperimentConfig
from fedshard.core.models.alexnet import FULL_WIDTHS, SPLIT_DIM, AlexNet

ALEXNET = models.get("alexnet")
TABLE = ALEXNET.table()
slice_widths = ALEXNET.slice_widths
forward_flops, parameter_count = ALEXNET.forward_flops, ALEXNET.parameter_count


@pytest.fixture(scope="module")
def full_state():
    torch.manual_seed(0)
    return AlexNet().state_dict()


def test_full_model_matches_the_reference_size():
    assert (
        sum(p.numel() for p in AlexNet().parameters()) == 55_063_268
    )  # ~55.1M (docs/experiments.md; layer by layer: 4,309,632 conv + 50,753,636 fc)
    out = AlexNet()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 100)
    assert torch.allclose(out.exp().sum(1), torch.ones(2))  # log-softmax


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 96])
def test_assemble_inverts_slice_exactly(full_state, n):
    slices = sharding.slice_state(full_state, n, TABLE)
    assert len(slices) == n
    back = sharding.assemble(slices, TABLE, weights=list(range(1, n + 1)))
    assert list(back) == list(full_state)
    for name, tensor in full_state.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("n,index", [(2, 0), (2, 1), (3, 2), (5, 4)])
def test_each_slice_is_the_weights_of_a_narrower_alexnet(full_state, n, index):
    piece = sharding.slice_state(full_state, n, TABLE)[index]
    model = ALEXNET.network(slice_widths(n, index))
    model.load_state_dict(piece)  # shapes must match exactly
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


def test_slice_follows_the_table_and_numpy(full_state):
    n = 3
    slices = sharding.slice_state(full_state, n, TABLE)
    for name, tensor in full_state.items():
        layer, kind = name.split(".")
        dim = SPLIT_DIM[layer]
        if kind == "bias" and dim == 1:
            expected = [tensor.numpy()] * n  # input-split layers keep their bias whole
        else:
            expected = np.array_split(tensor.numpy(), n, axis=dim)
        for s, e in zip(slices, expected):
            np.testing.assert_array_equal(s[name].numpy(), e)


def test_whole_kept_biases_are_sample_weighted_means():
    torch.manual_seed(1)
    parts = [AlexNet(slice_widths(2, i)).state_dict() for i in range(2)]
    merged = sharding.assemble(parts, TABLE, weights=[30, 10])
    for layer in ("conv2", "conv4", "conv6", "fc2", "fc4"):
        b0, b1 = parts[0][f"{layer}.bias"].numpy(), parts[1][f"{layer}.bias"].numpy()
        np.testing.assert_allclose(merged[f"{layer}.bias"].numpy(), 0.75 * b0 + 0.25 * b1, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(
        merged["fc1.weight"].numpy(), np.concatenate([parts[0]["fc1.weight"], parts[1]["fc1.weight"]], 0)
    )
    np.testing.assert_array_equal(
        merged["fc2.weight"].numpy(), np.concatenate([parts[0]["fc2.weight"], parts[1]["fc2.weight"]], 1)
    )


def test_uneven_widths_use_tensor_split_sizes():
    assert slice_widths(5, 0)["conv1"] == 20 and slice_widths(5, 4)["conv1"] == 19
    for n in (1, 2, 5, 7, 96):
        for layer, width in FULL_WIDTHS.items():
            assert sum(slice_widths(n, i)[layer] for i in range(n)) == width


def test_rotation_schedule_matches_design():
    # trainer k trains slice (k + r // swap_every) % n in round r, rounds from 1
    n, every = 3, 2
    table = {r: sharding.assignment(r, n, True, every) for r in range(1, 7)}
    assert table == {1: [0, 1, 2], 2: [1, 2, 0], 3: [1, 2, 0], 4: [2, 0, 1], 5: [2, 0, 1], 6: [0, 1, 2]}
    assert sharding.assignment(5, n, False, every) == [0, 1, 2]
    assert sharding.assignment(3, 2, True, 1) == [1, 0]
    for r in range(1, 20):
        assert sorted(sharding.assignment(r, 4, True, 3)) == [0, 1, 2, 3]


def test_tensor_parallel_strategy_round_trips_through_split_and_combine(full_state):
    cfg = ExperimentConfig(world_size=3, enable_swapping=True)
    tp = strategies.build(cfg)
    assert isinstance(tp, strategies.TensorParallel)
    parts = tp.assignment(2)  # a rotated round
    assert parts == [1, 2, 0]
    payloads = tp.split(full_state, 2)
    assert payloads[0]["conv1.weight"].shape[0] == slice_widths(3, 1)["conv1"]
    back = tp.combine(full_state, payloads, payloads, [5, 5, 5], 2)
    for name in full_state:
        assert torch.equal(back[name], full_state[name])


def test_fedavg_is_the_sample_weighted_mean():
    torch.manual_seed(2)
    models = [AlexNet().state_dict() for _ in range(3)]
    cfg = ExperimentConfig(world_size=3, strategy="fedavg")
    fa = strategies.build(cfg)
    assert fa.assignment(4) == [0, 0, 0] and fa.widths(0) == FULL_WIDTHS
    merged = fa.combine(models[0], fa.split(models[0], 4), models, [1, 2, 5], 4)
    for name in ("conv1.weight", "fc4.bias"):
        expected = sum(w * m[name].double().numpy() for w, m in zip([1, 2, 5], models)) / 8
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_unknown_strategy_is_named_and_the_registry_is_what_config_accepts():
    from fedshard.core.config import STRATEGIES, ConfigError

    with pytest.raises(ConfigError, match="'ring'.*tensor_parallel, fedavg"):
        ExperimentConfig(strategy="ring")
    assert tuple(strategies.REGISTRY) == STRATEGIES
    for name in STRATEGIES:  # every strategy the config accepts builds, and has the loop's hooks
        built = strategies.build(ExperimentConfig(world_size=2, strategy=name))
        assert built.name == name and isinstance(built, strategies.Strategy)


@pytest.mark.parametrize("n, index", [(1, 0), (2, 0), (3, 2)])
def test_model_size_and_forward_flops_match_pytorch_own_counts(n, index):
    from torch.utils.flop_counter import FlopCounterMode

    widths = slice_widths(n, index)
    model = AlexNet(widths)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    assert forward_flops(widths) == counter.get_total_flops()
    assert parameter_count(widths) == sum(p.numel() for p in model.parameters())
    if n == 1:
        assert parameter_count() == 55_063_268
    sizes = strategies.model_sizes(ExperimentConfig(world_size=n))
    assert sizes["model.params_full"] == 55_063_268 and sizes["model.flops_per_image_full"] == forward_flops()
    largest = max(range(n), key=lambda k: parameter_count(slice_widths(n, k)))
    assert sizes["model.params_per_trainer"] == parameter_count(slice_widths(n, largest))
    fedavg = strategies.model_sizes(ExperimentConfig(world_size=max(n, 2), strategy="fedavg"))
    assert fedavg["model.params_per_trainer"] == 55_063_268


# --- layerwise swapping (docs/experiments.md), computed by hand on tiny tensors ----------------------


def _tiny_model() -> dict[str, torch.Tensor]:  # AlexNet's conv1 and conv2 (the table's names) in miniature
    """conv1 (output-split) and conv2 (input-split) with 4 channels between them: two blocks of 2
    for two trainers. Weights are small integers, so every sum below is exact in float32."""
    return {
        "conv1.weight": torch.arange(4.0).view(4, 1),
        "conv1.bias": torch.zeros(4),
        "conv2.weight": torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]),
        "conv2.bias": torch.tensor([1.0, -1.0]),
    }


def _round(strategy, model, round_, change):
    """One round in which trainer k adds change[k] to every tensor it received."""
    sent = strategy.split(model, round_)
    trained = [{name: t + change[k] for name, t in payload.items()} for k, payload in enumerate(sent)]
    return sent, strategy.combine(model, sent, trained, [5, 5], round_)


def test_layerwise_swapping_adds_each_change_at_the_trainers_own_block():
    lw = strategies.build(ExperimentConfig(world_size=2, enable_swapping=False, enable_layerwise_swapping=True))
    model = _tiny_model()
    # Round 1: trainer 0 trains slice 0 and receives conv2's input block (0 + 1) mod 2 = 1; trainer 1 block 0.
    sent, after1 = _round(lw, model, 1, [1.0, 10.0])
    assert torch.equal(sent[0]["conv2.weight"], torch.tensor([[3.0, 4.0], [7.0, 8.0]]))
    assert torch.equal(sent[1]["conv2.weight"], torch.tensor([[1.0, 2.0], [5.0, 6.0]]))
    assert torch.equal(sent[0]["conv1.weight"], torch.tensor([[0.0], [1.0]]))  # other layers: its own slice
    # Each change lands at the trainer's own slice position: block 0 gets trainer 0's +1, block 1 trainer 1's +10.
    assert torch.equal(after1["conv2.weight"], torch.tensor([[2.0, 3.0, 13.0, 14.0], [6.0, 7.0, 17.0, 18.0]]))
    assert torch.equal(after1["conv1.weight"], torch.tensor([[1.0], [2.0], [12.0], [13.0]]))
    assert torch.equal(after1["conv2.bias"], torch.tensor([6.5, 4.5]))  # + the mean change, 5.5
    # Round 2: (s + 2) mod 2 = s, every trainer receives its own block again.
    sent, after2 = _round(lw, after1, 2, [-2.0, 4.0])
    assert torch.equal(sent[0]["conv2.weight"], torch.tensor([[2.0, 3.0], [6.0, 7.0]]))
    assert torch.equal(after2["conv2.weight"], torch.tensor([[0.0, 1.0, 17.0, 18.0], [4.0, 5.0, 21.0, 22.0]]))
    assert torch.equal(after2["conv2.bias"], torch.tensor([7.5, 5.5]))


def test_layerwise_swapping_follows_the_rotated_slice():
    # With slice swapping, s is the slice after rotation: in round 2 trainer 0 trains slice 1 and so
    # receives conv2's input block (1 + 2) mod 2 = 1, and its change lands at block 1.
    both = strategies.build(ExperimentConfig(world_size=2, enable_swapping=True, enable_layerwise_swapping=True))
    assert both.assignment(2) == [1, 0]
    sent, after = _round(both, _tiny_model(), 2, [1.0, 10.0])
    assert torch.equal(sent[0]["conv2.weight"], torch.tensor([[3.0, 4.0], [7.0, 8.0]]))
    assert torch.equal(sent[0]["conv1.weight"], torch.tensor([[2.0], [3.0]]))
    assert torch.equal(after["conv2.weight"], torch.tensor([[11.0, 12.0, 4.0, 5.0], [15.0, 16.0, 8.0, 9.0]]))


def test_layerwise_combine_is_change_based():
    # Trainers that change nothing leave the model as it was, though each held another block of
    # conv2: a rule that put the trained weights back (weight-based) would swap conv2's two blocks.
    lw = strategies.build(ExperimentConfig(world_size=2, enable_swapping=False, enable_layerwise_swapping=True))
    model = _tiny_model()
    _, after = _round(lw, model, 1, [0.0, 0.0])
    for name in model:
        assert torch.equal(after[name], model[name]), name
    plain = strategies.build(ExperimentConfig(world_size=2, enable_swapping=False))
    weight_based = plain.combine(model, lw.split(model, 1), lw.split(model, 1), [5, 5], 1)
    assert not torch.equal(weight_based["conv2.weight"], model["conv2.weight"])
