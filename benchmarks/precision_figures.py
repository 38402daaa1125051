"""fp32 against bf16 on the CPU, the full AlexNet: training (forward, backward, fused Adam step;
batch 64) and evaluation, images per second, and the speedup of bf16.

The threads are those a world-size-1 trainer gets (all the cores this process may use). Each
figure is the median of 4 timed steps after 2 warm-up steps, the measurement the issue that
asked for bf16 made (fp32 19.1, bf16 autocast 31.0, bf16 with channels_last 27.9 img/s on an
AMD EPYC with avx512_bf16). Where the CPU does not compute bf16 natively, fedshard never runs
in bf16 there (precision.py), and PyTorch's emulation takes minutes per step: the bf16 figures
are then not measured, and the table says why.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from fedshard import precision, training
from fedshard.model import AlexNet

from common import threads
from report import Section

BATCH, WARMUP, TIMED = 64, 2, 4


def _median_seconds(step) -> float:
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(TIMED):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_images_per_s(bf16: bool, channels_last: bool = False) -> float:
    torch.manual_seed(0)
    model = AlexNet()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 100, (BATCH,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = F.nll_loss(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return BATCH / _median_seconds(step)


def eval_images_per_s(bf16: bool, images: int = 1000) -> float:
    torch.manual_seed(0)
    model = AlexNet()
    data = training.DeviceData(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8),
                               torch.randint(0, 100, (images,)))
    return images / _median_seconds(lambda: training.evaluate(model, data, batch_size=1000, bf16=bf16))


def precision_section(cores: int) -> Section:
    """cpu_train_images_per_s_{fp32,bf16}, cpu_bf16_speedup and the same for evaluation."""
    native = precision.cpu_has_native_bf16()
    with threads(cores):
        f = {"cpu_train_images_per_s_fp32": train_images_per_s(False),
             "cpu_eval_images_per_s_fp32": eval_images_per_s(False)}
        if native:
            f["cpu_train_images_per_s_bf16"] = train_images_per_s(True)
            f["cpu_train_images_per_s_bf16_channels_last"] = train_images_per_s(True, channels_last=True)
            f["cpu_eval_images_per_s_bf16"] = eval_images_per_s(True)
            f["cpu_bf16_speedup"] = f["cpu_train_images_per_s_bf16"] / f["cpu_train_images_per_s_fp32"]
            f["cpu_eval_bf16_speedup"] = f["cpu_eval_images_per_s_bf16"] / f["cpu_eval_images_per_s_fp32"]
    why = "" if native else "  (no native bf16 on this CPU: bf16 not measured)"
    rows = [("cpu_bf16_speedup" + why, f.get("cpu_bf16_speedup"), "x"),
            ("  train, fp32", f["cpu_train_images_per_s_fp32"], "img/s"),
            ("  train, bf16", f.get("cpu_train_images_per_s_bf16"), "img/s"),
            ("  train, bf16 + channels_last", f.get("cpu_train_images_per_s_bf16_channels_last"), "img/s"),
            ("cpu_eval_bf16_speedup", f.get("cpu_eval_bf16_speedup"), "x"),
            ("  evaluate, fp32", f["cpu_eval_images_per_s_fp32"], "img/s"),
            ("  evaluate, bf16", f.get("cpu_eval_images_per_s_bf16"), "img/s")]
    return Section({**f, "native_bf16": native, "threads": cores, "batch": BATCH}, f, rows)
