"""Rank 0: the round loop, written once: collect -> combine -> dispatch the next -> evaluate and commit.

The strategy (strategies.py) decides how the model is split and combined; everything else is
here: sending and receiving (transport.py), evaluating the assembled model, counting the bytes
each round moves, and making each round durable (checkpoint, then metrics). Only the aggregator
logs per-round metrics.

The loop is pipelined: round r+1 is dispatched before round r's model is evaluated and stored,
so the trainers train while the aggregator evaluates and writes the checkpoint, and neither
adds time to a round.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from fedshard.core import checkpoint, data, models, precision, strategies
from fedshard.core.config import RUN_PREFIX, ExperimentConfig
from fedshard.core.training import (
    DeviceData,
    Preprocessing,
    configure_backends,
    evaluate,
    evaluation_input,
    resolve_device,
)
from fedshard.runtime import initial, progress, transport

log = logging.getLogger(__name__)


class Committer:
    """Makes rounds durable in the background, one at a time and in order (tracking.commit_round:
    checkpoint, then metrics), so that storing a 220 MB checkpoint overlaps the next round's
    training as evaluation does. A failed commit is raised at the next call, failing the run."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="commit")
        self.pending: Future | None = None

    def submit(self, round_: int, metrics: dict[str, float], weights: dict | None) -> None:
        from fedshard import tracking

        self.wait()  # at most one round in flight: bounded memory, errors surface a round later at most
        self.pending = self.pool.submit(tracking.commit_round, self.run_id, round_, metrics, weights, self.still_ours)

    def still_ours(self) -> None:
        """Raise ClaimLost once the run was taken over (this experiment's launcher was paused past the
        claim timeout, and a sweep continues the run): a round of ours must not land in it."""
        from fedshard import tracking

        hand = os.environ.get(tracking.claims.HAND_ENV)  # the hand the launcher holds the run at
        if hand is not None:
            tracking.claims.check(self.run_id, int(hand))

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


@dataclass
class Dispatched:
    """A round sent to the trainers: what collecting it needs, and the bytes sent to each trainer."""

    round: int
    parts: list[int]
    payloads: list[dict]
    bytes_down: list[int]


class Rounds:
    """The state the round loop carries from round to round: the model, the bytes moved so far,
    the evaluation copy of the model and the background committer."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_id: str,
        weights: dict,
        moved: float | None,
        test: DeviceData,
        relay: progress.Relay | None = None,
    ):
        self.cfg, self.run_id, self.weights, self.test, self.relay = cfg, run_id, weights, test, relay
        self.moved = moved  # cumulative bytes; None for a run recorded before bytes were counted
        self.strategy = strategies.build(cfg)
        self.committer = Committer(run_id)
        # The evaluation copy of the full model: every round loads the assembled weights into it.
        self.model = models.get(cfg.model).shapes().to_empty(device=test.images.device)
        self.prep = Preprocessing.of(cfg.model, cfg.image_size)
        self.started = time.perf_counter()

    def dispatch(self, round_: int) -> Dispatched:
        """Send round `round_`'s parts to the trainers, from the current model."""
        parts = self.strategy.assignment(round_)
        payloads = self.strategy.split(self.weights, round_)
        self.started = time.perf_counter()
        if self.relay is not None:
            self.relay.round_started(round_)
        return Dispatched(
            round_,
            parts,
            payloads,
            transport.send_round(round_, parts, payloads, self.cfg.round_timeout, self.strategy.round_settings(round_)),
        )

    def collect(self, dispatched: Dispatched) -> list[transport.TrainerReport]:
        return transport.collect_round(
            dispatched.round, dispatched.parts, dispatched.payloads, timeout=self.cfg.round_timeout
        )

    def combine(self, dispatched: Dispatched, reports: list[transport.TrainerReport]) -> dict[str, float]:
        """The new model from the trainers' parts; returns the round's training and traffic figures."""
        samples = [r.samples for r in reports]
        self.weights = self.strategy.combine(
            self.weights, dispatched.payloads, [r.state for r in reports], samples, dispatched.round
        )
        metrics = {
            "train_loss": sum(r.train_loss * r.samples for r in reports) / sum(samples),
            "round_seconds": time.perf_counter() - self.started,
            "comm/bytes_down": sum(dispatched.bytes_down),
            "comm/bytes_up": sum(r.nbytes for r in reports),
        }
        if self.moved is not None:
            self.moved += metrics["comm/bytes_down"] + metrics["comm/bytes_up"]
            metrics["comm/bytes_total"] = self.moved
        for r in reports:  # under a prefix per trainer, so the UI groups them in a section of their own
            metrics.update(
                {
                    f"trainer_{r.trainer}/train_loss": r.train_loss,
                    f"trainer_{r.trainer}/slice": r.part,
                    f"trainer_{r.trainer}/seconds": r.seconds,
                    f"trainer_{r.trainer}/bytes_down": dispatched.bytes_down[r.trainer],
                    f"trainer_{r.trainer}/bytes_up": r.nbytes,
                }
            )
        return metrics

    def evaluate_and_commit(self, round_: int, extra: dict[str, float]) -> None:
        """Evaluate the current model, make the round durable in the background, and say it."""
        self.model.load_state_dict(self.weights)
        start = time.perf_counter()
        loss, acc = evaluate(
            self.model, self.test, self.cfg.eval_batch_size, self.cfg.precision == "bf16", prep=self.prep
        )
        metrics = {"test_loss": loss, "test_accuracy": acc, "eval_seconds": time.perf_counter() - start, **extra}
        # Round 0 needs no checkpoint: the seed (or init_from) makes that model again.
        self.committer.submit(round_, metrics, self.weights if round_ > 0 else None)
        train = f" train_loss={extra['train_loss']:.4f} ({extra['round_seconds']:.1f}s)" if extra else ""
        log.info(f"round {round_}/{self.cfg.rounds}: test_loss={loss:.4f} test_accuracy={acc:.4f}{train}")


def run(
    cfg: ExperimentConfig,
    metaserver: str,
    run_id: str,
    secret: str = "",
    join_timeout: float = 600.0,
    start_from: str | None = None,
    progress_file: str | None = None,
) -> None:
    """Run rounds 1..cfg.rounds, or, with `start_from` (a checkpoint file), the rounds after its round;
    with `progress_file`, relay the trainers' progress inside each round there."""
    device = resolve_device(cfg.device)
    configure_backends(device, cfg.deterministic)
    # What this experiment computes in, decided once, here, for every process (precision.py).
    cfg = cfg.replace(precision=precision.resolve(cfg.precision, device.type))
    store = transport.open_experiment(metaserver, run_id, secret, timeout=cfg.round_timeout)
    # Trainers read the one frozen config from here, so every process runs the same experiment.
    store.set("config", cfg.to_json())
    test = DeviceData.from_numpy(*data.load_split(cfg.data_dir, "test", cfg.max_test_samples), device)
    if start_from:
        begin = checkpoint.load(start_from, cfg.model)
        first, weights, moved = begin.round, begin.weights, begin.metrics.get("comm/bytes_total")
    else:
        first, weights, moved = 0, initial.weights(cfg, initial.experiment_if_named(cfg, run_id)), 0.0
    relay = (
        progress.Relay(
            transport.experiment_store(metaserver, run_id, secret, cfg.round_timeout),
            progress_file,
            cfg.world_size,
            cfg.rounds,
            cfg.round_timeout,
        ).start()
        if progress_file
        else None
    )
    rounds = Rounds(cfg, run_id, weights, moved, test, relay)
    log.info(f"aggregator: waiting for {cfg.world_size} trainer(s)")
    transport.await_trainers(store, cfg.world_size, join_timeout)
    transport.join(store, transport.AGGREGATOR, cfg.world_size + 1, cfg.round_timeout, metaserver)
    if first:
        log.info(f"aggregator: continuing after round {first} (rounds 0..{first} are in the run)")

    dispatched = rounds.dispatch(first + 1) if first < cfg.rounds else None
    from fedshard import tracking  # only now: importing MLflow takes seconds the trainers need not wait for

    tracking.log_extra_params(run_id, strategies.model_sizes(cfg))
    if first == 0 and cfg.init_from.startswith(RUN_PREFIX):  # the name says what it was, the id which run
        source = tracking.source_run(cfg.init_from, initial.experiment_if_named(cfg, run_id))
        if source is not None:  # always, for run:<name> (no such run raised)
            tracking.set_tags(run_id, {tracking.INIT_FROM_RUN_TAG: source})
    tracking.record_precision(run_id, cfg)
    if first == 0:
        rounds.evaluate_and_commit(0, {})
    for round_ in range(first + 1, cfg.rounds + 1):
        assert dispatched is not None  # a round is left, so it was dispatched
        reports = rounds.collect(dispatched)
        metrics = rounds.combine(dispatched, reports)
        if round_ < cfg.rounds:
            dispatched = rounds.dispatch(round_ + 1)
        rounds.evaluate_and_commit(round_, metrics)
    rounds.committer.wait()
    if relay is not None:
        relay.close()
    transport.stop_trainers(cfg.world_size)
    rounds.committer.still_ours()
    tracking.log_model(
        run_id, rounds.weights, cfg.model, example=evaluation_input(test.images[:2], rounds.prep).cpu().numpy()
    )
    transport.leave()
    log.info("aggregator: all rounds complete")
