#!/usr/bin/env python
"""fedshard speed benchmark (issue 4): every figure measured side by side, in one run, on one machine.

    python benchmarks/bench.py --quick                  # < 5 minutes on a 2-core CPU
    python benchmarks/bench.py --json results.json      # bigger sizes, figures also as JSON

Figures (targets from the issue):

  data_pipeline_speedup   fedshard's training input pipeline (uint8 partition on the device,
                          batched crop/flip/normalise) vs the classic one (torchvision-style
                          dataset, PIL transforms, DataLoader with num_workers=0), same images,
                          same batch size, input pipeline alone. Both on one torch thread: the
                          classic pipeline is single-threaded by construction.
  eval_speedup            training.evaluate (large batches, inference_mode) vs a batch-size-1
                          DataLoader loop, same model and images.
  round_overhead_ratio    a real experiment (`fedshard run`, world_size 1) - best round_seconds
                          of rounds >= 2 (the aggregator evaluates round r while round r+1
                          trains, so these exclude evaluation) - over the best time of the same
                          local training (train_local, same images, threads, batch size) in this
                          process without any federation.
  startup_seconds         from starting `fedshard run` to the first training step (the time the
                          trainer logs), with an existing MLflow store.
  exchange_gbytes_per_s   full AlexNet weights (~220 MB) to a trainer process and back through
                          fedshard.transport on loopback: 2 x bytes / seconds.
  checkpoint_seconds      storing one round's checkpoint (220 MB) in the run's artifacts, as the
                          experiment's aggregator measured it (metric checkpoint_seconds, mean of
                          rounds >= 1). It runs in the background, overlapping the next round's
                          training; round_overhead_ratio shows what it costs a round.
  extension_speedup       wall time of a small sweep (world size 2, rounds 2 and 4, two seeds, one
                          experiment at a time) trained with --no-extend over the same sweep
                          where each 4-round run extends its 2-round twin (12 rounds against 8).
  CUDA only               training images/s (full model and a world_size-2 slice), achieved
                          TFLOP/s against the device's bf16 dense peak, and the projected wall
                          time of the default 54-run grid.

Only public tools time things: time.perf_counter, torch.cuda.synchronize, psutil. Every
figure is the best of a few repeats (the timeit convention: other processes on a shared
machine only ever add time), and the load average is printed so a reader can judge the noise.
This is a benchmark, not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from fedshard import training, transport
from fedshard.model import AlexNet, slice_widths
from fedshard.synthetic import write_synthetic_cifar100

TARGETS = {  # metric -> (comparison, bound, where the issue sets it)
    "data_pipeline_speedup": (">=", 10.0, "CPU"),
    "eval_speedup": (">=", 20.0, "H200"),
    "round_overhead_ratio": ("<=", 1.10, "CPU"),
    "startup_seconds": ("<=", 8.0, "CPU"),
    "exchange_gbytes_per_s": (">=", 1.0, "CPU"),
    "grid_projected_minutes": ("<=", 60.0, "H200"),
}

# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a
# substring of torch.cuda.get_device_name(). Unknown devices print n/a rather than a guess.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0}

CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
RUN_ID_LINE = re.compile(r"fedshard: run ([0-9a-f]{32})")
FIRST_STEP_LINE = re.compile(r"trainer (\d+): first training step at unix time ([0-9.]+)")


# ----------------------------------------------------------------------------- helpers


def cores() -> int:
    return len(os.sched_getaffinity(0))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
    """(best, all) seconds of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": cores(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "load_average_1min_start": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


# ----------------------------------------------------------------------------- input pipeline


class ClassicCIFAR(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR100 does: HWC uint8 numpy images, a PIL image per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.data = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # (N,32,32,3), as torchvision stores it
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def classic_transforms(train: bool):
    import torchvision.transforms as T

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(training.MEAN, training.STD)])


def bench_data_pipeline(images, labels, device, batch_size: int, repeats: int) -> dict:
    """Images/s of one pass over the same images, each pipeline delivering batches on `device`."""
    n = len(labels)
    loader = torch.utils.data.DataLoader(ClassicCIFAR(images, labels, classic_transforms(True)),
                                         batch_size=batch_size, shuffle=True, num_workers=0)
    data = training.DeviceData.from_numpy(images, labels, device)
    generator = torch.Generator(device).manual_seed(0)

    def classic():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync(device)

    def fedshard():
        for x, y in training.input_batches(data, batch_size, generator):
            pass
        sync(device)

    classic_times, fast_times = [], []
    with threads(1):
        fedshard()  # warm-up (allocator, CUDA kernels)
        for _ in range(repeats):  # interleaved, so both see the same background load
            classic_times.append(best_of(classic, 1)[0])
            fast_times.append(best_of(fedshard, 1)[0])
    classic_ips, fast_ips = n / min(classic_times), n / min(fast_times)
    return {"images": n, "batch_size": batch_size, "torch_threads": 1,
            "classic_images_per_s": classic_ips, "fedshard_images_per_s": fast_ips,
            "data_pipeline_speedup": fast_ips / classic_ips}


# ----------------------------------------------------------------------------- evaluation


def bench_eval(images, labels, device, n_fast: int, n_plain: int, amp: bool, repeats: int) -> dict:
    """training.evaluate vs a batch-size-1 DataLoader loop, full AlexNet, the process's threads."""
    torch.manual_seed(0)
    model = AlexNet().to(device)
    fast_data = training.DeviceData.from_numpy(images[:n_fast], labels[:n_fast], device)
    plain = torch.utils.data.DataLoader(ClassicCIFAR(images[:n_plain], labels[:n_plain], classic_transforms(False)),
                                        batch_size=1, shuffle=False, num_workers=0)

    def fast():
        training.evaluate(model, fast_data, batch_size=1000, amp=amp)

    def plain_loop():
        model.eval()
        loss, correct = 0.0, 0
        with torch.no_grad():
            for x, y in plain:
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss += F.nll_loss(out, y).item()
                correct += int((out.argmax(1) == y).item())
        return loss, correct

    training.evaluate(model, training.DeviceData(fast_data.images[:8], fast_data.labels[:8]), amp=amp)  # warm-up
    fast_s, _ = best_of(fast, repeats)
    plain_s, _ = best_of(plain_loop, 1)
    return {"fedshard_images": n_fast, "plain_images": n_plain, "amp": amp,
            "fedshard_images_per_s": n_fast / fast_s, "plain_images_per_s": n_plain / plain_s,
            "eval_speedup": (n_fast / fast_s) / (n_plain / plain_s)}


# ----------------------------------------------------------------------------- one real experiment


def run_experiment(data_dir: Path, workdir: Path, n_train: int, rounds: int, device: str) -> dict:
    """`fedshard run` as a user starts it; returns the run id, startup time and per-round metrics."""
    from mlflow.tracking import MlflowClient

    from fedshard import tracking

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    tracking.ensure_store()  # an existing store, as a user's is: its one-time creation is not startup
    command = [sys.executable, "-m", "fedshard", "run", "--world-size", "1", "--rounds", str(rounds),
               "--data-dir", str(data_dir), "--max-train-samples", str(n_train), "--max-test-samples", "32",
               "--batch-size", "64", "--experiment-name", "bench", "--device", device]
    out_path, err_path = workdir / "run.out", workdir / "run.err"
    # role -> unix time its process was first seen (startup breakdown), polled every 50 ms: psutil's
    # create_time is derived from the boot time in whole seconds and can be off by up to a second.
    spawned: dict[str, float] = {}
    with out_path.open("w") as out, err_path.open("w") as err:
        t0 = time.time()
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        while proc.poll() is None:
            if time.time() - t0 > 1800:
                proc.kill()
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        cmd = child.cmdline()
                        role = next((a for a in cmd if a in ("metaserver", "aggregator", "trainer")), None)
                        if role and role not in spawned:
                            spawned[role] = time.time()
            time.sleep(0.05 if time.time() - t0 < 30 else 0.5)
    stdout = out_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"fedshard run failed ({proc.returncode}):\n{stdout[-3000:]}\n{err_path.read_text()[-3000:]}")
    match = RUN_ID_LINE.search(stdout)
    if not match:
        raise RuntimeError(f"no run id in the output of fedshard run:\n{stdout[-3000:]}")
    run_id = match.group(1)
    client = MlflowClient(uri)
    log = Path(client.download_artifacts(run_id, "logs/trainer_0.log", str(workdir)))
    steps = [float(m.group(2)) for m in FIRST_STEP_LINE.finditer(log.read_text())]
    if not steps:
        raise RuntimeError(f"trainer log {log} has no 'first training step' line")

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    return {"run_id": run_id, "startup_seconds": max(steps) - t0,
            "startup_breakdown": {f"{role}_spawned_s": t - t0 for role, t in sorted(spawned.items(), key=lambda kv: kv[1])},
            "round_seconds": history("round_seconds"), "trainer_seconds": history("trainer_0/seconds"),
            "eval_seconds": history("eval_seconds"), "checkpoint_seconds": history("checkpoint_seconds")}


def bench_local_training(images, labels, device, batch_size: int, repeats: int, amp: bool) -> dict:
    """train_local over the same images as the experiment's trainer, in this process."""
    data = training.DeviceData.from_numpy(images, labels, device)
    torch.manual_seed(0)
    model = AlexNet().to(device)
    warm = training.DeviceData(data.images[: 2 * batch_size], data.labels[: 2 * batch_size])
    training.train_local(model, warm, learning_rate=1e-3, epochs=1, batch_size=batch_size,
                         generator=torch.Generator(device).manual_seed(0), amp=amp)
    times = []
    for r in range(repeats):
        result = training.train_local(model, data, learning_rate=1e-3, epochs=1, batch_size=batch_size,
                                      generator=torch.Generator(device).manual_seed(r), amp=amp)
        times.append(result.seconds)
    return {"images": len(data), "seconds": times, "best_seconds": min(times)}


def bench_extension(data_dir: Path, workdir: Path, n_train: int, device: str) -> dict:
    """Wall time of one small sweep run twice in fresh stores: every run from round 0, and with
    each longer run extending its shorter twin. Both sweeps print their planned rounds."""
    grid = ["--world-sizes", "2", "--learning-rates", "1e-3", "--swap", "true", "--rounds", "2,4",
            "--seeds", "1,2", "-P", f"data_dir={data_dir}", "-P", f"max_train_samples={n_train}",
            "-P", "max_test_samples=32", "-P", f"device={device}", "--no-progress"]
    out = {}
    for name, extra in (("from_scratch", ["--no-extend"]), ("extended", [])):
        where = workdir / f"sweep-{name}"
        where.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_TRACKING_URI=f"sqlite:///{where / 'mlflow.db'}", PYTHONUNBUFFERED="1")
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "sweep.py"), *grid, *extra],
                                cwd=where, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"sweep ({name}) failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        line = next(ln for ln in result.stdout.splitlines() if ln.startswith("Rounds to train:"))
        out[name] = {"seconds": seconds, "rounds_line": line}
    out["extension_speedup"] = out["from_scratch"]["seconds"] / out["extended"]["seconds"]
    return out


def round_figures(exp: dict, local: dict) -> dict:
    later = {r: s for r, s in exp["round_seconds"].items() if r >= 2}
    best_round = min(later.values())
    best_trainer = min(s for r, s in exp["trainer_seconds"].items() if r >= 2)
    return {
        "round_overhead_ratio": best_round / local["best_seconds"],
        "best_round_seconds": best_round,
        "local_training_seconds": local["best_seconds"],
        # Same run, same moment: the trainer's own training time vs the whole round.
        "round_over_trainer_seconds": best_round / best_trainer,
        "round_seconds_by_round": exp["round_seconds"],
        "trainer_seconds_by_round": exp["trainer_seconds"],
        "eval_seconds_by_round": exp["eval_seconds"],
        "checkpoint_seconds": sum(exp["checkpoint_seconds"].values()) / len(exp["checkpoint_seconds"]),
        "checkpoint_seconds_by_round": exp["checkpoint_seconds"],
    }


# ----------------------------------------------------------------------------- weight exchange


def _store(address: str, run_id: str, secret: str, timeout: float, aggregator: bool):
    """The experiment's key space, through whichever rendezvous API this fedshard has."""
    if hasattr(transport, "open_experiment"):
        opener = transport.open_experiment if aggregator else transport.enter_experiment
        return opener(address, run_id, secret, timeout)
    return transport.connect(address, run_id, secret, timeout=timeout)


def _call(fn, **kwargs):
    """Call a fedshard.transport function with those of `kwargs` it takes, by name: the
    benchmark keeps working while the transport gains arguments (a round number, a timeout,
    the metaserver address)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _join(store, rank: int, address: str, timeout: float = 120.0) -> None:
    _call(transport.join, store=store, rank=rank, world_size=2, timeout=timeout, metaserver=address)


def _collect(round_: int, parts, payloads, timeout: float = 120.0):
    return _call(transport.collect_round, round_=round_, parts=parts, payloads=payloads, timeout=timeout)


def echo_trainer(address: str, run_id: str, secret: str, numel: int, raw_repeats: int) -> None:
    """A trainer that sends back what it receives (child process of bench_exchange); after
    STOP, the same there-and-back with bare gloo send/recv on one reused buffer, for reference."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = _store(address, run_id, secret, 120.0, aggregator=False)
    _join(store, 1, address)
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


def bench_exchange(repeats: int) -> dict:
    import torch.distributed as dist

    state = AlexNet().state_dict()
    numel = sum(t.numel() for t in state.values())
    nbytes = 4 * numel
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    address, run_id, secret = f"127.0.0.1:{master.port}", "bench-exchange", "bench"
    store = _store(address, run_id, secret, 120.0, aggregator=True)
    child = subprocess.Popen([sys.executable, __file__, "--echo-trainer", address, run_id, secret, str(numel),
                              str(repeats + 1)], stdin=subprocess.DEVNULL)
    try:
        _join(store, transport.AGGREGATOR, address)
        times = []
        for r in range(repeats + 1):  # the first is a warm-up (buffers, connection)
            start = time.perf_counter()
            transport.send_round(r + 1, [0], [state], timeout=600)
            reports = _collect(r + 1, [0], [state])
            times.append(time.perf_counter() - start)
        back = reports[0].state
        if not all(torch.equal(back[k], state[k]) for k in state):
            raise RuntimeError("weights came back changed")
        transport.stop_trainers(1)
        # Reference points for the same bytes: bare gloo on a reused buffer (what the wire
        # allows), and the one copy fedshard makes to send (flattening the state dict).
        buffer = transport.flatten(list(state.values()))
        raw = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            dist.send(buffer, 1)
            dist.recv(buffer, 1)
            raw.append(time.perf_counter() - start)
        flatten_s, _ = best_of(lambda: transport.flatten(list(state.values())), repeats)
        transport.leave()
        if child.wait(timeout=60) != 0:
            raise RuntimeError(f"echo trainer exited with {child.returncode}")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    best = min(times[1:])
    return {"bytes": nbytes, "params": numel, "seconds": times[1:], "best_seconds": best,
            "exchange_gbytes_per_s": 2 * nbytes / best / 1e9,
            "raw_gloo_gbytes_per_s": 2 * nbytes / min(raw[1:]) / 1e9, "flatten_seconds": flatten_s}


# ----------------------------------------------------------------------------- CUDA only


def forward_flops_per_image(widths: dict | None = None) -> int:
    """2 x multiply-accumulates of AlexNet's convolutions and linear layers for one 32x32 image,
    counted from the layers' shapes (hooks on a meta-device forward: no memory, no compute)."""
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            macs += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, torch.nn.Linear):
            macs += output.numel() * module.in_features

    with torch.device("meta"):
        model = AlexNet(widths)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(count)
    model(torch.empty(1, 3, 32, 32, device="meta"))
    return 2 * macs


def bf16_peak_tflops(name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS.items():  # most specific keys first
        if key in name:
            return peak
    return None


def bench_cuda_training(device, n_images: int, widths: dict | None, seconds_cap: float) -> dict:
    """train_local images/s on synthetic uint8 data on the GPU, amp and channels_last as in a run."""
    gen = torch.Generator(device).manual_seed(0)
    data = training.DeviceData(torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, device=device, generator=gen),
                               torch.randint(0, 100, (n_images,), device=device, generator=gen))
    torch.manual_seed(0)
    model = AlexNet(widths).to(device)
    warm = training.DeviceData(data.images[:1024], data.labels[:1024])
    training.train_local(model, warm, learning_rate=1e-3, epochs=1, batch_size=64, generator=gen, amp=True)  # cuDNN autotune
    times = []
    deadline = time.perf_counter() + seconds_cap
    while len(times) < 3 and (not times or time.perf_counter() < deadline):
        times.append(training.train_local(model, data, learning_rate=1e-3, epochs=1, batch_size=64,
                                          generator=gen, amp=True).seconds)
    return {"images": n_images, "seconds": times, "images_per_s": n_images / min(times)}


def packed_worker(widths_n: int, seconds: float, go_file: str, device_name: str = "cuda", n: int = 4096) -> None:
    """One of several concurrent training processes on the GPU (child of bench_packing)."""
    device = torch.device(device_name)
    training.configure_backends(device, deterministic=False)
    widths = slice_widths(widths_n, 0) if widths_n > 1 else None
    gen = torch.Generator(device).manual_seed(0)
    data = training.DeviceData(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device, generator=gen),
                               torch.randint(0, 100, (n,), device=device, generator=gen))
    model = AlexNet(widths).to(device)
    training.train_local(model, data, learning_rate=1e-3, epochs=1, batch_size=64, generator=gen, amp=True)
    print("ready", flush=True)
    while not os.path.exists(go_file):
        time.sleep(0.01)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += training.train_local(model, data, learning_rate=1e-3, epochs=1, batch_size=64,
                                       generator=gen, amp=True).samples
    print(json.dumps({"images_per_s": images / (time.perf_counter() - start)}), flush=True)


def bench_packing(processes: int, widths_n: int, seconds: float, device: str = "cuda", n: int = 4096) -> dict:
    """Aggregate training images/s of `processes` experiments' trainers sharing the GPU at once."""
    with tempfile.TemporaryDirectory() as tmp:
        go = os.path.join(tmp, "go")
        children = [subprocess.Popen([sys.executable, __file__, "--packed-worker", str(widths_n), str(seconds), go,
                                      device, str(n)], stdout=subprocess.PIPE, text=True)
                    for _ in range(processes)]
        try:
            for c in children:
                if c.stdout.readline().strip() != "ready":
                    raise RuntimeError("a packed worker failed to start")
            Path(go).touch()
            rates = [json.loads(c.stdout.readline())["images_per_s"] for c in children]
            for c in children:
                c.wait(timeout=60)
        finally:
            for c in children:
                if c.poll() is None:
                    c.kill()
                    c.wait()
    return {"processes": processes, "images_per_s_each": rates, "images_per_s_total": sum(rates)}


def project_grid(train_ips: dict[int, float], eval_ips: float, exchange_gbps: float, startup_s: float,
                 packing: dict) -> dict:
    """Wall time of the default 54-run grid (1 local epoch per round), each longer run extending
    its shorter twin (1,350 rounds trained rather than 2,160).

    Per round of a world_size-n run: its trainers share one GPU, so training 50,000 images
    takes 50,000 / (images/s of one n-slice trainer) (no credit for two trainers overlapping);
    evaluation of 10,000 images is added although the aggregator overlaps it with training;
    the weight exchange moves the full model (slices add up to it) there and back. Each run
    adds its startup. Runs are packed P at a time on the GPU (what `sweep` does with several
    runs per device), which speeds everything up by the measured aggregate/single throughput.
    """
    from fedshard import grid, planning

    work = planning.plan(grid.expand(grid.make_grid({})), [])  # with extension: 1,350 rounds
    full_bytes = 4 * sum(t.numel() for t in AlexNet().state_dict().values())
    serial = 0.0
    for task in work.tasks:
        cfg = task.cfg
        per_round = (CIFAR_TRAIN * cfg.local_epochs / train_ips[cfg.world_size] + CIFAR_TEST / eval_ips
                     + 2 * full_bytes / (exchange_gbps * 1e9))
        serial += startup_s + task.rounds_to_train * per_round
    speedup = packing["images_per_s_total"] / packing["single_images_per_s"]
    return {"runs": len(work.tasks), "rounds": work.rounds_to_train, "serial_minutes": serial / 60,
            "packed_processes": packing["processes"], "packing_speedup": speedup,
            "grid_projected_minutes": serial / speedup / 60}


# ----------------------------------------------------------------------------- the table


def verdict(metric: str, value, on_cuda: bool) -> tuple[str, str]:
    """(target text, 'yes' / 'NO' / 'n/a'): a GPU target is not judged on a CPU run."""
    if metric not in TARGETS or value is None:
        return "", ""
    op, bound, where = TARGETS[metric]
    if where != "CPU" and not on_cuda:
        return f"{op} {bound:g} ({where})", "n/a"
    ok = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound:g} ({where})", "yes" if ok else "NO"


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def table(rows: list[tuple[str, object, str]], on_cuda: bool) -> str:
    lines = [("metric", "value", "unit", "target", "met?")]
    for metric, value, unit in rows:
        target, met = verdict(metric, value, on_cuda)
        lines.append((metric, fmt(value), unit, target, met))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    out = []
    for k, line in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: under 5 minutes on a 2-core CPU")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--pack", type=int, default=4, help="CUDA: runs sharing the GPU in the grid projection")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the sweeps with and without extension")
    args = parser.parse_args(argv)

    device = training.resolve_device(args.device)
    training.configure_backends(device, deterministic=False)
    on_cuda = device.type == "cuda"
    q = args.quick
    sizes = {
        "pipeline_images": 4096 if q else 16384, "pipeline_repeats": 3,
        "eval_fast_images": (10_000 if on_cuda else 128) if q else (10_000 if on_cuda else 512),
        "eval_plain_images": (1000 if on_cuda else 128) if q else (2000 if on_cuda else 512),
        "experiment_images": (8192 if on_cuda else 512) if q else (50_000 if on_cuda else 1024),
        "experiment_rounds": 3 if q else 4, "local_repeats": 2 if q else 3,
        "exchange_repeats": 3 if q else 10,
        "cuda_train_images": 16384 if q else 50_000,
        "sweep_images": (8192 if on_cuda else 128) if q else (50_000 if on_cuda else 512),
    }
    info = machine(device)
    say(f"machine: {info}")
    results: dict = {"machine": info, "quick": q, "sizes": sizes, "details": {}}
    figures: dict[str, float | None] = {}

    with tempfile.TemporaryDirectory(prefix="fedshard-bench-") as tmp:
        tmp = Path(tmp)
        n_train = max(sizes["pipeline_images"], sizes["experiment_images"])
        n_test = max(sizes["eval_fast_images"], sizes["eval_plain_images"])
        say(f"writing synthetic CIFAR-100 ({n_train} train, {n_test} test images)")
        write_synthetic_cifar100(tmp / "data", n_train=n_train, n_test=n_test, n_classes=100, seed=0)
        from fedshard.data import load_split

        train_x, train_y = load_split(tmp / "data", "train")
        test_x, test_y = load_split(tmp / "data", "test")
        torch.set_num_threads(cores())

        say("input pipeline: classic DataLoader+PIL vs fedshard on-device batches")
        d = bench_data_pipeline(train_x[: sizes["pipeline_images"]], train_y[: sizes["pipeline_images"]], device,
                                64, sizes["pipeline_repeats"])
        results["details"]["data_pipeline"] = d
        figures["data_pipeline_speedup"] = d["data_pipeline_speedup"]

        say("evaluation: batched vs batch size 1")
        e = bench_eval(test_x, test_y, device, sizes["eval_fast_images"], sizes["eval_plain_images"], amp=on_cuda,
                       repeats=2)
        results["details"]["eval"] = e
        figures["eval_speedup"] = e["eval_speedup"]

        say("weight exchange: full AlexNet there and back through fedshard.transport")
        x = bench_exchange(sizes["exchange_repeats"])
        results["details"]["exchange"] = x
        figures["exchange_gbytes_per_s"] = x["exchange_gbytes_per_s"]

        n, rounds = sizes["experiment_images"], sizes["experiment_rounds"]
        say(f"local training without federation: {n} images, {sizes['local_repeats']} repeats")
        local_before = bench_local_training(train_x[:n], train_y[:n], device, 64, 1, amp=on_cuda)
        say(f"experiment: fedshard run, world_size 1, {rounds} rounds over {n} images")
        exp = run_experiment(tmp / "data", tmp, n, rounds, device.type)
        say("local training again (so both sides sample the machine's load)")
        local_after = bench_local_training(train_x[:n], train_y[:n], device, 64, sizes["local_repeats"] - 1, amp=on_cuda)
        local = {"images": n, "seconds": local_before["seconds"] + local_after["seconds"]}
        local["best_seconds"] = min(local["seconds"])
        r = round_figures(exp, local)
        results["details"]["experiment"] = {"run_id": exp["run_id"], **r, "local_training": local,
                                            "startup_seconds": exp["startup_seconds"],
                                            "startup_breakdown": exp["startup_breakdown"]}
        figures["round_overhead_ratio"] = r["round_overhead_ratio"]
        figures["startup_seconds"] = exp["startup_seconds"]
        figures["checkpoint_seconds"] = r["checkpoint_seconds"]

        ext = None
        if not args.no_sweeps:
            say("sweeps: rounds 2 and 4, two seeds, from scratch and with extension")
            ext = bench_extension(tmp / "data", tmp, sizes["sweep_images"], device.type)
            results["details"]["extension"] = ext
            figures["extension_speedup"] = ext["extension_speedup"]

        rows = [
            ("data_pipeline_speedup", figures["data_pipeline_speedup"], "x"),
            ("  fedshard pipeline", d["fedshard_images_per_s"], "img/s"),
            ("  classic pipeline", d["classic_images_per_s"], "img/s"),
            ("eval_speedup", figures["eval_speedup"], "x"),
            ("  fedshard evaluate", e["fedshard_images_per_s"], "img/s"),
            ("  batch-size-1 loop", e["plain_images_per_s"], "img/s"),
            ("round_overhead_ratio", figures["round_overhead_ratio"], "x"),
            ("  best round (rounds >= 2)", r["best_round_seconds"], "s"),
            ("  same training, no federation", r["local_training_seconds"], "s"),
            ("  round / trainer's own time", r["round_over_trainer_seconds"], "x"),
            ("checkpoint_seconds (in the background)", figures["checkpoint_seconds"], "s"),
            ("startup_seconds", figures["startup_seconds"], "s"),
            *[(f"  {k.replace('_spawned_s', '')} process started", v, "s")
              for k, v in exp["startup_breakdown"].items()],
            ("exchange_gbytes_per_s", figures["exchange_gbytes_per_s"], "GB/s"),
            ("  bare gloo, reused buffer", x["raw_gloo_gbytes_per_s"], "GB/s"),
            ("  flattening 220 MB to send", x["flatten_seconds"], "s"),
        ]
        if ext:
            rows += [("extension_speedup", figures["extension_speedup"], "x"),
                     ("  sweep, every run from round 0", ext["from_scratch"]["seconds"], "s"),
                     ("  sweep, 4-round runs extend 2-round", ext["extended"]["seconds"], "s")]

        if on_cuda:
            say("CUDA: training throughput, TFLOP/s, packing, grid projection")
            full = bench_cuda_training(device, sizes["cuda_train_images"], None, 120)
            half = bench_cuda_training(device, sizes["cuda_train_images"], slice_widths(2, 0), 120)
            flops = forward_flops_per_image()
            achieved = 3 * flops * full["images_per_s"] / 1e12
            peak = bf16_peak_tflops(info.get("gpu", ""))
            single = bench_packing(1, 1, 10 if q else 20)
            packed = bench_packing(args.pack, 1, 10 if q else 20) if args.pack > 1 else single
            packing = {**packed, "single_images_per_s": single["images_per_s_total"]}
            grid = project_grid({1: full["images_per_s"], 2: half["images_per_s"]}, e["fedshard_images_per_s"],
                                x["exchange_gbytes_per_s"], exp["startup_seconds"], packing)
            results["details"]["cuda"] = {"train_full": full, "train_half_slice": half,
                                          "forward_gflop_per_image": flops / 1e9, "achieved_tflops": achieved,
                                          "bf16_peak_tflops": peak, "packing": packing, "grid": grid}
            figures.update(train_images_per_s=full["images_per_s"], achieved_tflops=achieved,
                           grid_projected_minutes=grid["grid_projected_minutes"])
            rows += [
                ("train_images_per_s (full model)", full["images_per_s"], "img/s"),
                ("  world_size-2 slice", half["images_per_s"], "img/s"),
                ("achieved_tflops", achieved, "TFLOP/s"),
                ("  of bf16 dense peak", achieved / peak if peak else None, f"of {peak:g}" if peak else ""),
                (f"  packing speedup ({args.pack} runs)", grid["packing_speedup"], "x"),
                ("grid_projected_minutes", grid["grid_projected_minutes"], "min"),
                ("  one run at a time", grid["serial_minutes"], "min"),
            ]

    info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    results["figures"] = figures
    results["targets"] = {}
    for m, (op, b, w) in TARGETS.items():
        met = verdict(m, figures.get(m), on_cuda)[1]
        results["targets"][m] = {"op": op, "bound": b, "where": w, "met": {"yes": True, "NO": False}.get(met)}
    busy = info["load_average_1min_start"] > 0.5 * info["cores"] or info["load_average_1min_end"] > 0.5 * info["cores"]
    print(f"fedshard benchmark, {info['date']}{' (--quick)' if q else ''}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, "
          f"torch {info['torch']}, device {info.get('gpu', info['device'])}")
    print(f"load average (1 min) at start / end: {info['load_average_1min_start']} / {info['load_average_1min_end']}"
          + ("  <- other processes were running; timings are noisy" if busy else ""))
    print(table(rows, on_cuda))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--echo-trainer":
        echo_trainer(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--packed-worker":
        packed_worker(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        sys.exit(main())
