"""Rendezvous and the weight exchange between the aggregator (rank 0) and trainers (ranks 1..n).

Only tensors cross the wire: each message is a small int64/float64 header and
one flat, contiguous float32 buffer holding every tensor of a (sliced) state
dict, parameters and buffers, in one order both sides take from `packing_order`,
so a round costs two sends per trainer and direction whatever the number of
layers (three down for a strategy with per-round settings: its record, a few
float64 numbers). Integer buffers (batch norm's int64
step counters) travel as their bytes, two float32 words each, and come back
exactly. Nothing received is ever unpickled. The aggregator's side counts the
bytes of every tensor it sends and receives, where it sends and receives them:
that is what a run records as its communication (comm/bytes_down, bytes_up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from fedshard.core.errors import FedshardError, first_line

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    D = TypeVar("D", bound=DataclassInstance)  # a strategy's settings record

log = logging.getLogger(__name__)

AGGREGATOR = 0
STOP, TRAIN = 0, 1


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metaserver address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:29500")
    return host.strip("[]"), int(port)


def namespace(run_id: str, secret: str = "") -> str:
    """Store key prefix of one experiment: only processes that know run id and secret meet there."""
    digest = hashlib.sha256(f"{run_id}\0{secret}".encode()).hexdigest()[:24]
    return f"fedshard/{run_id}/{digest}/"


def _verifier(run_id: str, secret: str) -> str:
    # Published in the clear so a trainer with the wrong secret is told so at once;
    # it reveals neither the secret nor the namespace digest above.
    return hashlib.sha256(f"verify\0{run_id}\0{secret}".encode()).hexdigest()


class JoinRefused(FedshardError, RuntimeError):
    """This process may not join the experiment: it does not hold the experiment's secret, or its
    trainer index was taken."""


def _client(address: str, timeout: float) -> dist.TCPStore:
    host, port = parse_address(address)
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))


def open_experiment(address: str, run_id: str, secret: str, timeout: float) -> dist.Store:
    """Aggregator side: announce the experiment and return its private key space."""
    base = _client(address, timeout)
    dist.PrefixStore(f"fedshard/{run_id}/", base).set("verifier", _verifier(run_id, secret))
    return dist.PrefixStore(namespace(run_id, secret), base)


def experiment_store(address: str, run_id: str, secret: str, timeout: float) -> dist.Store:
    """A connection of its own to the experiment's key space (for a thread beside the process group)."""
    return dist.PrefixStore(namespace(run_id, secret), _client(address, timeout))


def enter_experiment(address: str, run_id: str, secret: str, timeout: float) -> dist.Store:
    """Trainer side: wait for the experiment (up to `timeout`), prove the secret, enter its key space."""
    base = _client(address, timeout)
    announced = dist.PrefixStore(f"fedshard/{run_id}/", base).get("verifier").decode()
    if announced != _verifier(run_id, secret):
        raise JoinRefused(f"refused: the secret given does not match experiment {run_id} at {address}")
    return dist.PrefixStore(namespace(run_id, secret), base)


def claim_rank(store: dist.Store, trainer: int) -> None:
    """Trainer side: take trainer index `trainer`; a second process started with the same
    --rank (a command pasted twice) is refused instead of breaking the process group."""
    token = secrets.token_hex(8)
    if store.compare_set(f"trainer/{trainer}", "", token).decode() != token:
        raise JoinRefused(f"refused: trainer {trainer} of this experiment has already joined")


class TrainersMissing(FedshardError, RuntimeError):
    """Not every trainer arrived within the join timeout."""


def await_trainers(store: dist.Store, world_size: int, timeout: float) -> None:
    """Aggregator side: wait until every trainer has claimed its index, naming each as it arrives
    and, after `timeout` seconds, the ones still missing (on other machines they start by hand)."""
    deadline = time.monotonic() + timeout
    missing = list(range(world_size))
    while missing:
        for k in [k for k in missing if store.check([f"trainer/{k}"])]:
            missing.remove(k)
            log.info(f"aggregator: trainer {k} joined")
        if missing and time.monotonic() > deadline:
            raise TrainersMissing(f"trainer(s) {missing} did not join within join_timeout={timeout:g}s")
        time.sleep(0.1)


def interface_towards(host: str) -> str | None:
    """The local network interface this machine reaches `host` through, or None if unknown."""
    import psutil

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # a UDP connect sends nothing: the kernel only picks the route
            local = probe.getsockname()[0]
    except OSError:
        return None
    return next(
        (
            name
            for name, addrs in psutil.net_if_addrs().items()
            if any(a.family == socket.AF_INET and a.address == local for a in addrs)
        ),
        None,
    )


def join(store: dist.Store, rank: int, world_size: int, timeout: float, metaserver: str) -> None:
    """Form the gloo process group of the experiment; `timeout` bounds every later send/recv.

    gloo listens on, and tells its peers, the address of one interface: GLOO_SOCKET_IFNAME when
    set, else the one this machine reaches the metaserver through (loopback for a local
    experiment), which is also how peers on other machines reach this one."""
    if not os.environ.get("GLOO_SOCKET_IFNAME"):
        interface = interface_towards(parse_address(metaserver)[0])
        if interface:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _words(t: torch.Tensor) -> torch.Tensor:
    """A tensor as float32 words: floating ones as float32 values, integer ones as their bytes."""
    t = t.detach().reshape(-1).cpu()
    return t.float() if t.is_floating_point() else t.contiguous().view(torch.float32)


def word_count(t: torch.Tensor) -> int:
    """The float32 words `t` takes in a flat buffer."""
    return t.numel() if t.is_floating_point() else t.numel() * t.element_size() // 4


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous float32 CPU buffer of all tensors, in order (the only copy made to send)."""
    return torch.cat([_words(t) for t in tensors])


def packing_order(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The order a state dict's tensors travel in, on both sides of the wire: by name. Neither side
    relies on the other building its state dict in the same order."""
    return sorted(state)


def pack(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A state dict as one flat float32 buffer, in packing_order."""
    return flatten([state[name] for name in packing_order(state)])


def unpack(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict `pack` made of a state dict shaped like `like` (unflatten, in packing_order)."""
    return unflatten(flat, {name: like[name] for name in packing_order(like)})


def packed_words(state: Mapping[str, torch.Tensor]) -> int:
    """The float32 words `pack(state)` has."""
    return sum(word_count(t) for t in state.values())


def flat_payloads(payloads: Sequence[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Each payload flattened, the same payload once: FedAvg sends every trainer the one model, and
    n copies of its 220 MB would all be alive until the sends complete."""
    flats: dict[int, torch.Tensor] = {}  # by id: the payloads are alive, so their ids are their own
    for payload in payloads:
        if id(payload) not in flats:
            flats[id(payload)] = pack(payload)
    return [flats[id(payload)] for payload in payloads]


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors shaped and typed like those of `like`: views into `flat` for floating ones (no copies),
    the bytes read back as their integers for integer ones (a copy of a few words: a view would
    need `flat`'s offset there to be aligned)."""
    parts = flat.split([word_count(t) for t in like.values()])
    return {
        name: (part if t.is_floating_point() else part.clone().view(t.dtype)).view(t.shape)
        for (name, t), part in zip(like.items(), parts)
    }


# --- aggregator side ----------------------------------------------------------------


@dataclass
class TrainerReport:
    trainer: int
    part: int
    samples: int
    train_loss: float
    seconds: float
    state: dict[str, torch.Tensor]
    nbytes: int  # bytes received from the trainer: its numbers and its weights


class RoundFailed(FedshardError, RuntimeError):
    """A round's exchange did not complete: a trainer died, hung past the timeout or misbehaved."""


def _wait_all(works: Sequence[tuple[int, dist.Work]], timeout: float, round_: int, doing: str) -> None:
    """Wait for every (trainer, work) within one deadline of `timeout` seconds: the first wait may
    use all of it, later ones only what is left (finished work returns at once). Raises
    RoundFailed naming every trainer whose transfer did not complete."""
    deadline = time.monotonic() + timeout
    failures: dict[int, str] = {}
    for k, work in works:
        try:
            work.wait(timedelta(seconds=max(0.05, deadline - time.monotonic())))
        except RuntimeError as exc:
            failures.setdefault(k, first_line(exc))
    if failures:
        raise RoundFailed(
            f"round {round_}: trainer(s) {sorted(failures)} did not answer within "
            f"round_timeout={timeout:g}s ({doing}): {next(iter(failures.values()))}"
        )


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _isend(tensor: torch.Tensor, rank: int) -> dist.Work:
    return _in_group(dist.isend(tensor, rank), rank)


def _irecv(tensor: torch.Tensor, rank: int) -> dist.Work:
    return _in_group(dist.irecv(tensor, rank), rank)


def _in_group(work: dist.Work | None, rank: int) -> dist.Work:
    """torch gives no Work for a peer outside the process group: that is a bug here, said so."""
    if work is None:
        raise RuntimeError(f"rank {rank} is not in this experiment's process group")
    return work


def settings_tensor(settings: DataclassInstance) -> torch.Tensor:
    """A strategy's settings record (a dataclass of numbers) as the float64 tensor it travels as:
    its fields in order, typed on both sides by the record's class, never pickled."""
    return torch.tensor(dataclasses.astuple(settings), dtype=torch.float64)


def send_round(
    round_: int,
    parts: Sequence[int],
    payloads: Sequence[Mapping[str, torch.Tensor]],
    timeout: float,
    settings: Sequence[DataclassInstance] | None = None,
) -> list[int]:
    """Send trainer k its part `parts[k]`, the weights `payloads[k]` of that part and, if its
    strategy has any, its settings record `settings[k]` for this round; return the bytes sent to
    each trainer."""
    sends, sent = [], []
    for k, (part, flat) in enumerate(zip(parts, flat_payloads(payloads))):
        header = torch.tensor([TRAIN, round_, part], dtype=torch.int64)
        tensors = [header, flat] + (
            [settings_tensor(settings[k])] if settings and dataclasses.fields(settings[k]) else []
        )
        sends += [(k, _isend(t, k + 1)) for t in tensors]
        sent.append(nbytes(*tensors))
    _wait_all(sends, timeout, round_, "taking their weights")
    return sent


def collect_round(
    round_: int, parts: Sequence[int], payloads: Sequence[Mapping[str, torch.Tensor]], timeout: float
) -> list[TrainerReport]:
    """Receive what each trainer trained within `timeout` seconds; `payloads` (what was sent)
    gives the shapes. Raises RoundFailed naming every trainer whose result did not arrive."""
    receives, buffers = [], []
    for k, payload in enumerate(payloads):
        stats = torch.empty(4, dtype=torch.float64)
        flat = torch.empty(packed_words(payload), dtype=torch.float32)
        receives += [(k, _irecv(stats, k + 1)), (k, _irecv(flat, k + 1))]
        buffers.append((stats, flat))
    _wait_all(receives, timeout, round_, "sending their results")
    reports = []
    for k, ((stats, flat), payload) in enumerate(zip(buffers, payloads)):
        samples, loss, seconds, part = stats.tolist()
        if int(part) != parts[k]:
            raise RuntimeError(f"trainer {k} returned slice {int(part)}, expected {parts[k]}")
        reports.append(
            TrainerReport(k, int(part), int(samples), loss, seconds, unpack(flat, payload), nbytes(stats, flat))
        )
    return reports


def stop_trainers(n: int) -> None:
    works = [_isend(torch.tensor([STOP, 0, 0], dtype=torch.int64), k + 1) for k in range(n)]
    for work in works:
        work.wait()


# --- trainer side -------------------------------------------------------------------


def receive_header() -> tuple[int, int, int]:
    """(command, round, part) from the aggregator; blocks until it arrives."""
    header = torch.empty(3, dtype=torch.int64)
    dist.recv(header, AGGREGATOR)
    command, round_, part = header.tolist()
    return command, round_, part


def receive_weights(like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of this round's part, shaped like `like` (the part's own state dict)."""
    flat = torch.empty(packed_words(like), dtype=torch.float32)
    dist.recv(flat, AGGREGATOR)
    return unpack(flat, like)


def receive_settings(record: type[D]) -> D:
    """This round's settings record of the strategy, an instance of `record` (nothing travels for a
    record without fields)."""
    if not dataclasses.fields(record):
        return record()
    values = torch.empty(len(dataclasses.fields(record)), dtype=torch.float64)
    dist.recv(values, AGGREGATOR)
    return record(*values.tolist())


def send_result(state: Mapping[str, torch.Tensor], part: int, samples: int, train_loss: float, seconds: float) -> None:
    stats = torch.tensor([samples, train_loss, seconds, part], dtype=torch.float64)
    dist.send(stats, AGGREGATOR)
    dist.send(pack(state), AGGREGATOR)
