"""The weight exchange: full AlexNet weights (about 220 MB) to a trainer process and back through
fedshard.runtime.transport on loopback, as a round moves them: exchange_gbytes_per_s = 2 x bytes / seconds.

Two reference points for the same bytes come with it: bare gloo send/recv on one reused buffer
(what the wire allows), and the one copy fedshard makes to send (flattening the state dict).

    python benchmarks/exchange.py --echo-trainer ADDRESS RUN_ID SECRET NUMEL REPEATS
                                  # the trainer side, started by bench_exchange
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch
import torch.distributed as dist

from common import best_of
from fedshard.core import models
from fedshard.runtime import transport
from report import Section

TIMEOUT = 120.0  # seconds for the rendezvous and each transfer: loopback needs a fraction of it


def echo_trainer(address: str, run_id: str, secret: str, numel: int, raw_repeats: int) -> None:
    """A trainer that sends back what it receives; after STOP, the same there-and-back with bare
    gloo send/recv on one reused buffer."""
    torch.set_num_threads(1)
    store = transport.enter_experiment(address, run_id, secret, TIMEOUT)
    transport.join(store, 1, world_size=2, timeout=TIMEOUT, metaserver=address)
    while True:
        command, _, part = transport.receive_header()
        if command == transport.STOP:
            break
        flat = transport.receive_weights(numel)
        transport.send_result(flat, part, 0, 0.0, 0.0)
    buffer = torch.empty(numel)
    for _ in range(raw_repeats):
        dist.recv(buffer, transport.AGGREGATOR)
        dist.send(buffer, transport.AGGREGATOR)
    transport.leave()


def _round_trips(state: dict, repeats: int) -> list[float]:
    """Seconds of each there-and-back through fedshard.runtime.transport, the first being a warm-up
    (buffers, connection); raises if the weights do not come back unchanged."""
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        transport.send_round(r + 1, [0], [state], timeout=TIMEOUT)
        reports = transport.collect_round(r + 1, [0], [state], timeout=TIMEOUT)
        times.append(time.perf_counter() - start)
    back = reports[0].state
    if not all(torch.equal(back[k], state[k]) for k in state):
        raise RuntimeError("weights came back changed")
    return times


def _raw_gloo(buffer: torch.Tensor, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dist.send(buffer, 1)
        dist.recv(buffer, 1)
        times.append(time.perf_counter() - start)
    return times


def bench_exchange(repeats: int) -> dict:
    state = models.get("alexnet").network().state_dict()
    numel = sum(t.numel() for t in state.values())
    nbytes = 4 * numel
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    address, run_id, secret = f"127.0.0.1:{master.port}", "bench-exchange", "bench"
    store = transport.open_experiment(address, run_id, secret, TIMEOUT)
    child = subprocess.Popen(
        [sys.executable, __file__, "--echo-trainer", address, run_id, secret, str(numel), str(repeats + 1)],
        stdin=subprocess.DEVNULL,
    )
    try:
        transport.join(store, transport.AGGREGATOR, world_size=2, timeout=TIMEOUT, metaserver=address)
        times = _round_trips(state, repeats)
        transport.stop_trainers(1)
        raw = _raw_gloo(transport.flatten(list(state.values())), repeats)
        flatten_s, _ = best_of(lambda: transport.flatten(list(state.values())), repeats)
        transport.leave()
        if child.wait(timeout=60) != 0:
            raise RuntimeError(f"echo trainer exited with {child.returncode}")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    best = min(times[1:])
    return {
        "bytes": nbytes,
        "params": numel,
        "seconds": times[1:],
        "best_seconds": best,
        "exchange_gbytes_per_s": 2 * nbytes / best / 1e9,
        "raw_gloo_gbytes_per_s": 2 * nbytes / min(raw[1:]) / 1e9,
        "flatten_seconds": flatten_s,
    }


def exchange_section(repeats: int) -> Section:
    x = bench_exchange(repeats)
    return Section(
        x,
        {"exchange_gbytes_per_s": x["exchange_gbytes_per_s"]},
        [
            ("exchange_gbytes_per_s", x["exchange_gbytes_per_s"], "GB/s"),
            ("  bare gloo, reused buffer", x["raw_gloo_gbytes_per_s"], "GB/s"),
            ("  flattening 220 MB to send", x["flatten_seconds"], "s"),
        ],
    )


if __name__ == "__main__" and sys.argv[1:2] == ["--echo-trainer"]:
    echo_trainer(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
