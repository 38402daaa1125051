"""fp32 against bf16 on the CPU, the full AlexNet: training (forward, backward, fused Adam step;
batch 64) and evaluation, images per second, and the speedup of bf16.

The threads are those a world-size-1 trainer gets (all the cores this process may use). Each
figure is the best of `steps` timed steps after 2 warm-up steps (common.best_of): 4 steps and
1,000 evaluated images, or with --quick 3 steps and 256 images (training keeps batch 64). On
the development machine of the time, an AMD EPYC with avx512_bf16, the same steps (median of 4)
gave fp32 19.1, bf16 autocast 31.0, bf16 with channels_last 27.9 training img/s
(benchmarks/RESULTS.md). Where the CPU does not compute bf16 natively, fedshard never runs in
bf16 there (precision.py), and PyTorch's emulation is over ten times slower: the bf16 figures
are then not measured, and the table says why.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from common import best_of, threads
from fedshard.core import models, precision, training
from report import Section

BATCH, WARMUP = 64, 2


def _best_seconds(step, steps: int) -> float:
    return best_of(step, steps, warmup=WARMUP)[0]


def train_images_per_s(bf16: bool, channels_last: bool = False, steps: int = 4) -> float:
    torch.manual_seed(0)
    model = models.get("alexnet").network()
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

    return BATCH / _best_seconds(step, steps)


def eval_images_per_s(bf16: bool, images: int = 1000, steps: int = 4) -> float:
    torch.manual_seed(0)
    model = models.get("alexnet").network()
    data = training.DeviceData(
        torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 100, (images,))
    )
    return images / _best_seconds(lambda: training.evaluate(model, data, batch_size=1000, bf16=bf16), steps)


def precision_section(cores: int, steps: int = 4, eval_images: int = 1000) -> Section:
    """cpu_train_images_per_s_{fp32,bf16}, cpu_bf16_speedup and the same for evaluation."""
    native = precision.cpu_has_native_bf16()
    with threads(cores):
        f = {
            "cpu_train_images_per_s_fp32": train_images_per_s(False, steps=steps),
            "cpu_eval_images_per_s_fp32": eval_images_per_s(False, eval_images, steps),
        }
        if native:
            f["cpu_train_images_per_s_bf16"] = train_images_per_s(True, steps=steps)
            f["cpu_train_images_per_s_bf16_channels_last"] = train_images_per_s(True, True, steps)
            f["cpu_eval_images_per_s_bf16"] = eval_images_per_s(True, eval_images, steps)
            f["cpu_bf16_speedup"] = f["cpu_train_images_per_s_bf16"] / f["cpu_train_images_per_s_fp32"]
            f["cpu_eval_bf16_speedup"] = f["cpu_eval_images_per_s_bf16"] / f["cpu_eval_images_per_s_fp32"]
    why = "" if native else "  (no native bf16 on this CPU: bf16 not measured)"
    rows = [
        ("cpu_bf16_speedup" + why, f.get("cpu_bf16_speedup"), "x"),
        ("  train, fp32", f["cpu_train_images_per_s_fp32"], "img/s"),
        ("  train, bf16", f.get("cpu_train_images_per_s_bf16"), "img/s"),
        ("  train, bf16 + channels_last", f.get("cpu_train_images_per_s_bf16_channels_last"), "img/s"),
        ("cpu_eval_bf16_speedup", f.get("cpu_eval_bf16_speedup"), "x"),
        ("  evaluate, fp32", f["cpu_eval_images_per_s_fp32"], "img/s"),
        ("  evaluate, bf16", f.get("cpu_eval_images_per_s_bf16"), "img/s"),
    ]
    details = {
        **f,
        "native_bf16": native,
        "threads": cores,
        "batch": BATCH,
        "timed_steps": steps,
        "eval_images": eval_images,
    }
    return Section(details, f, rows)
