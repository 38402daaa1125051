"""Rank k+1: receive a slice -> train it on this trainer's own partition -> send it back.

A trainer knows only the metaserver, the experiment and its index; the config
comes from the aggregator through the store. Its partition stays with it for
the whole experiment.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch
from torch import nn

from fedshard.core import data, models, precision, strategies
from fedshard.core.config import ExperimentConfig
from fedshard.core.training import DeviceData, Preprocessing, configure_backends, resolve_device, train_local
from fedshard.runtime import progress, transport

log = logging.getLogger(__name__)


def round_seed(seed: int, trainer: int, round_: int) -> int:
    """Independent, reproducible randomness per (experiment seed, trainer, round)."""
    return int(np.random.SeedSequence([seed, trainer, round_]).generate_state(1)[0])


def run(
    metaserver: str, run_id: str, trainer: int, secret: str = "", timeout: float = 600.0, data_dir: str | None = None
) -> None:
    """`data_dir` overrides the experiment's, for a trainer on a machine that keeps CIFAR-100 elsewhere."""
    store = transport.enter_experiment(metaserver, run_id, secret, timeout=timeout)
    cfg = ExperimentConfig.from_json(store.get("config").decode())
    if not 0 <= trainer < cfg.world_size:
        raise ValueError(f"--rank {trainer}: this experiment has trainers 0..{cfg.world_size - 1}")
    if data_dir:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    device = resolve_device(cfg.device)
    configure_backends(device, cfg.deterministic)
    # The aggregator has resolved `auto`; bf16 on a CPU that does not compute it natively is refused.
    bf16 = precision.resolve(cfg.precision, device.type) == "bf16"
    images, labels = data.load_split(cfg.data_dir, "train", cfg.max_train_samples)
    mine = data.partition(labels, cfg.world_size, cfg.partition, cfg.seed, cfg.dirichlet_alpha)[trainer]
    own = DeviceData.from_numpy(images[mine], labels[mine], device)
    del images, labels
    log.info(f"trainer {trainer}: {len(own)} training images on {device}, {'bf16' if bf16 else 'fp32'}")
    transport.claim_rank(store, trainer)
    transport.join(store, trainer + 1, cfg.world_size + 1, cfg.round_timeout, metaserver)
    strategy = strategies.build(cfg)
    # Progress inside a round, and a beat while waiting, over a store connection of its own (progress.py).
    reporter = progress.TrainerReporter(
        transport.experiment_store(metaserver, run_id, secret, cfg.round_timeout), trainer, cfg.batch_size
    )
    spec, prep = models.get(cfg.model), Preprocessing.of(cfg.model, cfg.image_size)
    parts: dict[int, nn.Module] = {}
    rounds_trained = 0
    while True:
        command, round_, part = transport.receive_header()
        if command == transport.STOP:
            break
        if part not in parts:
            # Built without initialising: the aggregator's weights overwrite every parameter and buffer.
            parts[part] = spec.shapes(strategy.widths(part)).to_empty(device=device)
        model = parts[part]
        model.load_state_dict(transport.receive_weights(model.state_dict()))
        settings = transport.receive_settings(strategy.Settings)
        seed = round_seed(cfg.seed, trainer, round_)
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator(device).manual_seed(seed)  # shuffling and augmentation
        if not rounds_trained:
            # Wall-clock time of the first training step, for startup measurements (benchmarks/bench.py).
            log.info(f"trainer {trainer}: first training step at unix time {time.time():.3f}")
        rounds_trained += 1
        reporter.round_started(round_, len(own) * cfg.local_epochs)
        result = train_local(
            model,
            own,
            learning_rate=cfg.learning_rate,
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            generator=generator,
            bf16=bf16,
            on_step=reporter,
            optimizer=cfg.optimizer,
            prep=prep,
            extra_loss=strategy.local_loss(settings, model.state_dict()),
        )
        log.info(
            f"trainer {trainer}: round {round_} slice {part} loss={result.mean_loss:.4f} "
            f"({result.samples} images, {result.seconds:.1f}s)"
        )
        transport.send_result(model.state_dict(), part, result.samples, result.mean_loss, result.seconds)
    reporter.close()
    transport.leave()
    log.info(f"trainer {trainer}: done")
