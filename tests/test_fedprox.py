"""FedProx: FedAvg whose trainers add mu/2 ||w - w_round||^2 to their loss, told mu every round in a
typed settings record (strategies.py). Its math against hand-computed values; its record as it
travels; and, at mu = 0, exactly FedAvg."""

from __future__ import annotations

import torch
from torch import nn

from fedshard.core import strategies, training
from fedshard.core.config import ExperimentConfig
from fedshard.core.models.alexnet import AlexNet
from fedshard.runtime import transport


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.register_buffer("count", torch.tensor(7))  # a buffer: no part of the proximal term


def test_the_proximal_term_and_its_gradient_are_mu_over_2_times_the_squared_distance():
    prox = strategies.build(ExperimentConfig(world_size=3, strategy="fedprox", proximal_mu=0.5))
    assert isinstance(prox, strategies.FedProx) and isinstance(prox, strategies.Strategy)
    (settings, *_) = prox.round_settings(4)
    assert prox.round_settings(4) == [strategies.ProximalSettings(0.5)] * 3
    model = Tiny()
    term = prox.local_loss(settings, {"w": torch.tensor([0.0, 4.0]), "count": torch.tensor(0)})
    value = term(model)
    assert value.item() == 0.5 / 2 * ((1 - 0) ** 2 + (2 - 4) ** 2)  # 1.25
    value.backward()
    assert model.w.grad.tolist() == [0.5 * (1 - 0), 0.5 * (2 - 4)]  # mu (w - w_round)
    # The anchor is a copy: the model's own tensors, changed by training afterwards, do not move it.
    anchored = prox.local_loss(settings, model.state_dict())
    with torch.no_grad():
        model.w += 1
    assert anchored(model).item() == 0.5 / 2 * 2


def test_a_strategy_s_settings_travel_as_their_numbers_and_only_if_it_has_any():
    record = strategies.ProximalSettings(0.01)
    sent = transport.settings_tensor(record)
    assert sent.dtype == torch.float64 and sent.tolist() == [0.01]
    assert strategies.ProximalSettings(*sent.tolist()) == record
    for name in ("tensor_parallel", "fedavg"):
        plain = strategies.build(ExperimentConfig(world_size=2, strategy=name))
        assert plain.Settings is strategies.NoSettings and plain.local_loss(plain.round_settings(1)[0], {}) is None
    assert transport.receive_settings(strategies.NoSettings) == strategies.NoSettings()  # nothing to receive


def test_fedprox_combines_as_fedavg_and_at_mu_0_trains_exactly_as_it():
    torch.manual_seed(0)
    models_ = [AlexNet().state_dict() for _ in range(2)]
    fedavg = strategies.build(ExperimentConfig(world_size=2, strategy="fedavg"))
    prox = strategies.build(ExperimentConfig(world_size=2, strategy="fedprox"))
    a = fedavg.combine(models_[0], fedavg.split(models_[0], 1), models_, [3, 5], 1)
    b = prox.combine(models_[0], prox.split(models_[0], 1), models_, [3, 5], 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    zero = strategies.build(ExperimentConfig(world_size=2, strategy="fedprox", proximal_mu=0))
    assert zero.local_loss(zero.round_settings(1)[0], models_[0]) is None


def test_the_proximal_term_keeps_local_training_nearer_the_round_s_model(tmp_path):
    """A 1/16-width AlexNet trained for 2 steps from the same weights and data: with mu > 0 it ends
    nearer where it started."""
    from fedshard.core import data, models
    from fedshard.core.synthetic import write_synthetic_cifar100

    write_synthetic_cifar100(tmp_path, n_train=16, n_test=8, n_classes=4)
    images = training.DeviceData.from_numpy(*data.load_split(tmp_path, "train"), torch.device("cpu"))
    widths = models.get("alexnet").slice_widths(16, 0)
    distances = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = AlexNet(widths)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        prox = strategies.build(ExperimentConfig(world_size=2, strategy="fedprox", proximal_mu=mu))
        term = prox.local_loss(prox.round_settings(1)[0], model.state_dict())
        training.train_local(
            model,
            images,
            learning_rate=1e-3,
            epochs=1,
            batch_size=8,
            generator=torch.Generator().manual_seed(1),
            extra_loss=term,
        )
        distances[mu] = sum(((p - start[n]) ** 2).sum().item() for n, p in model.named_parameters())
    assert distances[10.0] < distances[0.0]
