"""Rank 0: assign -> send -> collect -> assemble -> evaluate -> log, once per round.

The round loop is written once; the strategy decides how the model is split
and combined. Only the aggregator logs per-round metrics.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from . import checkpoint, data, strategies, transport
from .config import ExperimentConfig
from .model import AlexNet
from .training import DeviceData, configure_backends, evaluate, normalize, resolve_device


def load_initial_weights(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The starting model: seeded random init, or the `init_from` weights (checked to fit)."""
    torch.manual_seed(cfg.seed)
    model = AlexNet()
    if cfg.init_from:
        from . import tracking

        state = tracking.load_weights(cfg.init_from)
        try:
            model.load_state_dict(state)
        except Exception as exc:
            raise ValueError(f"init_from={cfg.init_from!r} is not a fedshard AlexNet state dict: "
                             f"{str(exc).strip().splitlines()[0]}") from exc
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Committer:
    """Makes rounds durable in the background, one at a time and in order (tracking.commit_round:
    checkpoint, then metrics), so that storing a 220 MB checkpoint overlaps the next round's
    training as evaluation does. A failed commit is raised at the next call, failing the run."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="commit")
        self.pending: Future | None = None

    def submit(self, round_: int, metrics: dict[str, float], weights: dict | None) -> None:
        from . import tracking

        self.wait()  # at most one round in flight: bounded memory, errors surface a round later at most
        self.pending = self.pool.submit(tracking.commit_round, self.run_id, round_, metrics, weights)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


def run(cfg: ExperimentConfig, metaserver: str, run_id: str, secret: str = "", join_timeout: float = 600.0,
        start_from: str | None = None) -> None:
    """Run rounds 1..cfg.rounds, or, with `start_from` (a checkpoint file), the rounds after its round."""
    device = resolve_device(cfg.device)
    configure_backends(device, cfg.deterministic)
    store = transport.open_experiment(metaserver, run_id, secret, timeout=cfg.round_timeout)
    # Trainers read the one frozen config from here, so every process runs the same experiment.
    store.set("config", cfg.to_json())

    images, labels = data.load_split(cfg.data_dir, "test", cfg.max_test_samples)
    test = DeviceData.from_numpy(images, labels, device)
    if start_from:
        begin = checkpoint.load(start_from)
        first, weights = begin.round, begin.weights
        # Bytes moved before this run's first round; unknown for runs recorded before bytes were counted.
        moved = begin.metrics.get("comm/bytes_total")
    else:
        first, weights, moved = 0, load_initial_weights(cfg), 0.0
    with torch.device("meta"):  # evaluation copy: every round loads the assembled weights into it
        model = AlexNet()
    model.to_empty(device=device)
    strategy = strategies.get(cfg.strategy)
    print(f"aggregator: waiting for {cfg.world_size} trainer(s)", flush=True)
    transport.await_trainers(store, cfg.world_size, join_timeout, report=lambda m: print(m, flush=True))
    transport.join(store, transport.AGGREGATOR, cfg.world_size + 1, cfg.round_timeout, metaserver)
    if first:
        print(f"aggregator: continuing after round {first} (rounds 0..{first} are in the run)", flush=True)
    committer = Committer(run_id)

    def evaluate_and_commit(round_: int, extra: dict[str, float]) -> None:
        model.load_state_dict(weights)
        start = time.perf_counter()
        loss, acc = evaluate(model, test, cfg.eval_batch_size, cfg.amp)
        metrics = {"test_loss": loss, "test_accuracy": acc, "eval_seconds": time.perf_counter() - start, **extra}
        # Round 0 needs no checkpoint: the seed (or init_from) makes that model again.
        committer.submit(round_, metrics, weights if round_ > 0 else None)
        train = f" train_loss={extra['train_loss']:.4f} ({extra['round_seconds']:.1f}s)" if extra else ""
        print(f"round {round_}/{cfg.rounds}: test_loss={loss:.4f} test_accuracy={acc:.4f}{train}", flush=True)

    def dispatch(round_: int):
        """Send round `round_`'s work; returns what collect needs, and the bytes sent to each trainer."""
        parts = strategy.assignment(cfg, round_)
        payloads = strategy.split(weights, cfg, parts)
        return (round_, parts, payloads), transport.send_round(round_, parts, payloads, cfg.round_timeout)

    # Pipelined: the model of round r is evaluated (and stored) while the trainers already
    # train round r+1 from it, so neither adds time to a round.
    start = time.perf_counter()
    sent, down = dispatch(first + 1) if first < cfg.rounds else (None, None)
    from . import tracking  # imported only now: importing MLflow takes seconds the trainers need not wait

    tracking.log_extra_params(run_id, strategies.model_sizes(cfg))
    if first == 0:
        evaluate_and_commit(0, {})
    for round_ in range(first + 1, cfg.rounds + 1):
        reports = transport.collect_round(*sent, timeout=cfg.round_timeout)
        parts = sent[1]
        samples = [r.samples for r in reports]
        weights = strategy.combine([r.state for r in reports], samples, parts)
        extra = {
            "train_loss": sum(r.train_loss * r.samples for r in reports) / sum(samples),
            "round_seconds": time.perf_counter() - start,
            "comm/bytes_down": sum(down),
            "comm/bytes_up": sum(r.nbytes for r in reports),
        }
        if moved is not None:
            moved += extra["comm/bytes_down"] + extra["comm/bytes_up"]
            extra["comm/bytes_total"] = moved
        for r in reports:  # under a prefix per trainer, so the UI groups them in a section of their own
            extra[f"trainer_{r.trainer}/train_loss"] = r.train_loss
            extra[f"trainer_{r.trainer}/slice"] = r.part
            extra[f"trainer_{r.trainer}/seconds"] = r.seconds
            extra[f"trainer_{r.trainer}/bytes_down"] = down[r.trainer]
            extra[f"trainer_{r.trainer}/bytes_up"] = r.nbytes
        start = time.perf_counter()
        if round_ < cfg.rounds:
            sent, down = dispatch(round_ + 1)
        evaluate_and_commit(round_, extra)
    committer.wait()
    transport.stop_trainers(cfg.world_size)
    tracking.log_model(run_id, weights, example=normalize(test.images[:2]).cpu().numpy())
    transport.leave()
    print("aggregator: all rounds complete", flush=True)
