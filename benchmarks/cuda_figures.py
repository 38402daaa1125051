"""CUDA only: training images/s (the full model and a world-size-2 slice, bf16 autocast and
channels_last as in a run) and the TFLOP/s that achieves against the device's bf16 dense peak
(cuda_section); the throughput of several trainers sharing the GPU, and from these the default
grid's projection (grid_section, which gpu_check.py leaves out: it projects from real runs).

    python benchmarks/cuda_figures.py --packed-worker SLICES SECONDS GO_FILE DEVICE IMAGES
                                      # one of the trainers bench_packing starts side by side
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import projection
from fedshard.core import models, training
from report import Section

ALEXNET = models.get("alexnet")  # what these figures time: the default grid's model
# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a
# substring of torch.cuda.get_device_name(), most specific first. Unknown devices print n/a
# rather than a guess.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def bf16_peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def random_data(n: int, device: torch.device, generator: torch.Generator) -> training.DeviceData:
    """n random uint8 images and labels on the device: throughput does not depend on the pixels."""
    return training.DeviceData(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device, generator=generator),
        torch.randint(0, 100, (n,), device=device, generator=generator),
    )


def train_once(model, data: training.DeviceData, generator: torch.Generator) -> training.TrainResult:
    """One local epoch as a run trains it on a GPU: batch 64, bf16 autocast."""
    return training.train_local(
        model, data, learning_rate=1e-3, epochs=1, batch_size=64, generator=generator, bf16=True
    )


def bench_cuda_training(device, n_images: int, widths: dict | None, seconds_cap: float) -> dict:
    """train_local images/s, best of up to 3 epochs over n_images (fewer past `seconds_cap`)."""
    gen = torch.Generator(device).manual_seed(0)
    data = random_data(n_images, device, gen)
    torch.manual_seed(0)
    model = ALEXNET.network(widths).to(device)
    train_once(model, training.DeviceData(data.images[:1024], data.labels[:1024]), gen)  # cuDNN autotune
    times = []
    deadline = time.perf_counter() + seconds_cap
    while len(times) < 3 and (not times or time.perf_counter() < deadline):
        times.append(train_once(model, data, gen).seconds)
    return {"images": n_images, "seconds": times, "images_per_s": n_images / min(times)}


def packed_worker(widths_n: int, seconds: float, go_file: str, device_name: str = "cuda", n: int = 4096) -> None:
    """One of several concurrent training processes on the GPU: warms up, says ready, waits for
    `go_file` so that all start together, then trains for `seconds` and prints its images/s."""
    device = torch.device(device_name)
    training.configure_backends(device, deterministic=False)
    gen = torch.Generator(device).manual_seed(0)
    data = random_data(n, device, gen)
    model = ALEXNET.network(ALEXNET.slice_widths(widths_n, 0) if widths_n > 1 else None).to(device)
    train_once(model, data, gen)
    print("ready", flush=True)
    while not os.path.exists(go_file):
        time.sleep(0.01)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += train_once(model, data, gen).samples
    print(json.dumps({"images_per_s": images / (time.perf_counter() - start)}), flush=True)


def bench_packing(processes: int, widths_n: int, seconds: float, device: str = "cuda", n: int = 4096) -> dict:
    """Aggregate training images/s of `processes` experiments' trainers sharing the GPU at once."""
    with tempfile.TemporaryDirectory() as tmp:
        go = os.path.join(tmp, "go")
        children = [
            subprocess.Popen(
                [sys.executable, __file__, "--packed-worker", str(widths_n), str(seconds), go, device, str(n)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(processes)
        ]
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


def project_grid(
    full: dict, half: dict, eval_ips: float, exchange_gbps: float, startup_s: float, packing: dict
) -> dict:
    """The default grid's minutes from this run's parts (projection.rounds_from_rates)."""
    per_round = projection.rounds_from_rates(
        {1: full["images_per_s"], 2: half["images_per_s"]}, eval_ips, exchange_gbps, 4 * ALEXNET.parameter_count()
    )
    speedup = packing["images_per_s_total"] / packing["single_images_per_s"]
    return {**projection.project(per_round, startup_s, speedup), "packed_processes": packing["processes"]}


def cuda_section(device, n_images: int, gpu: str) -> Section:
    """Training images/s of the full model and of a world-size-2 slice, and the TFLOP/s achieved."""
    full = bench_cuda_training(device, n_images, None, 120)
    half = bench_cuda_training(device, n_images, ALEXNET.slice_widths(2, 0), 120)
    achieved = projection.training_flops_per_image() * full["images_per_s"] / 1e12
    peak = bf16_peak_tflops(gpu)
    details = {
        "train_full": full,
        "train_half_slice": half,
        "forward_gflop_per_image": ALEXNET.forward_flops() / 1e9,
        "achieved_tflops": achieved,
        "bf16_peak_tflops": peak,
    }
    figures = {"train_images_per_s": full["images_per_s"], "achieved_tflops": achieved}
    return Section(
        details,
        figures,
        [
            ("train_images_per_s (full model)", full["images_per_s"], "img/s"),
            ("  world_size-2 slice", half["images_per_s"], "img/s"),
            ("achieved_tflops", achieved, "TFLOP/s"),
            ("  of bf16 dense peak", achieved / peak if peak else None, f"of {peak:g}" if peak else ""),
        ],
    )


def grid_section(
    training: dict, pack: int, packing_seconds: float, eval_ips: float, exchange_gbps: float, startup_s: float
) -> Section:
    """`pack` trainers sharing the GPU against one, and the default grid's projection from the
    parts (`training`: cuda_section's details)."""
    single = bench_packing(1, 1, packing_seconds)
    packed = bench_packing(pack, 1, packing_seconds) if pack > 1 else single
    packing = {**packed, "single_images_per_s": single["images_per_s_total"]}
    grid = project_grid(
        training["train_full"], training["train_half_slice"], eval_ips, exchange_gbps, startup_s, packing
    )
    return Section(
        {"packing": packing, "grid": grid},
        {"grid_projected_minutes": grid["grid_projected_minutes"]},
        [
            ("grid_projected_minutes", grid["grid_projected_minutes"], "min"),
            ("  one run at a time", grid["serial_minutes"], "min"),
            (f"  packing speedup ({pack} runs)", grid["packing_speedup"], "x"),
        ],
    )


if __name__ == "__main__" and sys.argv[1:2] == ["--packed-worker"]:
    packed_worker(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]))
