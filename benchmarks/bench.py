#!/usr/bin/env python
"""fedshard speed benchmark: every figure measured side by side, in one run, on one machine.

    python benchmarks/bench.py --quick                  # about 9 minutes on a 2-core CPU (below)
    python benchmarks/bench.py --json results.json      # bigger sizes, figures also as JSON

Figures (their targets are TARGETS in report.py; how each is measured is in its module):

  data_pipeline_speedup   pipeline.py: fedshard's training input pipeline (uint8 partition on the
                          device, batched crop/flip/normalise) vs the classic one (torchvision-style
                          dataset, PIL transforms, DataLoader with num_workers=0), same images,
                          same batch size, input pipeline alone, both on one torch thread.
  eval_speedup            pipeline.py: training.evaluate (large batches, inference_mode) vs a
                          batch-size-1 DataLoader loop, same model and images.
  train_images_per_s_<model>_<size>px
                          model_figures.py: training images/s of every model of the registry
                          (fedshard.core.models) with its own recipe, the full model (and, in the
                          details, a world-size-2 slice) at 32x32 and at its own image size
                          (ResNet-34: 224x224), resized on the device as a trainer does.
  cpu_bf16_speedup        precision_figures.py (CPU only): full-AlexNet training images/s in bf16
                          autocast over fp32 (batch 64, the threads a world-size-1 trainer gets;
                          --quick times fewer steps and evaluates fewer images),
                          cpu_train_images_per_s_fp32 / _bf16, and the same for evaluation
                          (cpu_eval_bf16_speedup); bf16 only where the CPU computes it natively.
  round_overhead_ratio    experiment.py: a real experiment (`fedshard run`, world_size 1) - best
                          round_seconds of rounds >= 2 - over the best time of the same local
                          training (train_local, same images, threads, batch size) in this process.
  startup_seconds         experiment.py: from starting `fedshard run` to the first training step
                          (the time the trainer logs), with an existing MLflow store.
  startup_seconds_full_files_cold / _cached
                          experiment.py: startup_seconds of a one-round experiment reading files of
                          CIFAR-100's full size (150 MB), the dataset digests hashed (as at every
                          start before the digest cache) and then read from the cache.
  exchange_gbytes_per_s   exchange.py: full AlexNet weights (~220 MB) to a trainer process and
                          back through fedshard.runtime.transport on loopback: 2 x bytes / seconds.
  checkpoint_seconds      experiment.py: storing one round's checkpoint (220 MB) in the run's
                          artifacts, as the experiment's aggregator measured it (mean of rounds
                          >= 1). It overlaps the next round's training; round_overhead_ratio shows
                          what it costs a round.
  extension_speedup       experiment.py: wall time of a small sweep (world size 2, rounds 2 and 4,
                          two seeds, one experiment at a time) trained with --no-extend over the
                          same sweep where each 4-round run extends its 2-round twin.
  CUDA only               cuda_figures.py: training images/s (full model and a world_size-2
                          slice), achieved TFLOP/s against the device's bf16 dense peak, and
                          (unless --no-projection) the packing of --pack trainers on the GPU and
                          the projected wall time of the default 54-run grid (projection.py).

How each figure is taken. A timing that is repeated is the best of its repeats (common.best_of:
other processes on a shared machine only ever add time): the input pipeline, fedshard's
evaluation, the precision figures (after 2 warm-up steps), local training, the exchange and CUDA
training. A round of the experiment is its best round of rounds >= 2. Measured once: the
batch-size-1 evaluation loop, the CUDA packing (one timed period of trainers side by side),
startup_seconds and the full-size start-ups (one experiment each), extension_speedup (one sweep
each way); checkpoint_seconds is the mean of the run's rounds. The load average is printed so a
reader can judge the noise. This is a benchmark, not a test: nothing here runs in CI.

--quick: about 9 minutes on a 2-core CPU, about 5.5 with --no-sweeps (an estimate from the
sections' times in the runs of benchmarks/RESULTS.md, not a timed run of this version).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import common
import cuda_figures
import exchange
import experiment
import model_figures
import pipeline
import precision_figures
from common import say
from fedshard.core import training
from fedshard.core.data import load_split
from fedshard.core.synthetic import write_synthetic_cifar100
from report import Report


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: about 9 minutes on a 2-core CPU")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON (after each section)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--pack", type=int, default=4, help="CUDA: runs sharing the GPU in the grid projection")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the sweeps with and without extension")
    parser.add_argument(
        "--no-projection",
        action="store_true",
        help="CUDA: skip the packing and the grid projection (gpu_check.py makes its own)",
    )
    return parser.parse_args(argv)


def choose_sizes(quick: bool, on_cuda: bool) -> dict:
    """Images and repeats of each measurement: --quick for a first look (see the module docstring)."""

    def pick(cpu_quick, cpu_full, cuda_quick, cuda_full):
        return (cuda_quick if quick else cuda_full) if on_cuda else (cpu_quick if quick else cpu_full)

    return {
        "pipeline_images": 4096 if quick else 16384,
        "pipeline_repeats": 3,
        "eval_fast_images": pick(128, 512, 10_000, 10_000),
        "eval_plain_images": pick(128, 512, 1000, 2000),
        "experiment_images": pick(512, 1024, 8192, 50_000),
        "experiment_rounds": 3 if quick else 4,
        "local_repeats": 2 if quick else 3,
        "exchange_repeats": 3 if quick else 10,
        # training keeps batch 64, a trainer's; fewer timed steps and evaluated images
        "precision_steps": 3 if quick else 4,
        "precision_eval_images": 256 if quick else 1000,
        "cuda_train_images": 16384 if quick else 50_000,
        "sweep_images": pick(128, 512, 8192, 50_000),
    }


def write_data(root: Path, sizes: dict):
    """Synthetic CIFAR-100 in the official layout, enough for every measurement; (train, test) arrays."""
    n_train = max(sizes["pipeline_images"], sizes["experiment_images"])
    n_test = max(sizes["eval_fast_images"], sizes["eval_plain_images"])
    say(f"writing synthetic CIFAR-100 ({n_train} train, {n_test} test images)")
    write_synthetic_cifar100(root, n_train=n_train, n_test=n_test, n_classes=100, seed=0)
    return load_split(root, "train"), load_split(root, "test")


def cuda(report: Report, args, device, sizes: dict) -> None:
    """The CUDA-only sections, after the others: the grid projection uses their figures."""
    say("CUDA: training throughput, TFLOP/s")
    c = report.add("cuda", cuda_figures.cuda_section(device, sizes["cuda_train_images"], report.info.get("gpu", "")))
    if not args.no_projection:
        say("CUDA: packing, grid projection")
        report.add(
            "grid",
            cuda_figures.grid_section(
                c.details,
                args.pack,
                10 if args.quick else 20,
                report.results["details"]["eval"]["fedshard_images_per_s"],
                report.figures["exchange_gbytes_per_s"],
                report.figures["startup_seconds"],
            ),
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    device = training.resolve_device(args.device)
    training.configure_backends(device, deterministic=False)
    on_cuda = device.type == "cuda"
    sizes = choose_sizes(args.quick, on_cuda)
    info = common.machine(device)
    say(f"machine: {info}")
    report = Report(info, args.quick, sizes, on_gpu=on_cuda, path=args.json)

    with tempfile.TemporaryDirectory(prefix="fedshard-bench-") as tmp:
        tmp = Path(tmp)
        (train_x, train_y), (test_x, test_y) = write_data(tmp / "data", sizes)
        torch.set_num_threads(common.cores())

        # ------------------------------------------------------------------- input pipeline
        say("input pipeline: classic DataLoader+PIL vs fedshard on-device batches")
        n = sizes["pipeline_images"]
        report.add(
            "data_pipeline", pipeline.data_pipeline_section(train_x[:n], train_y[:n], device, sizes["pipeline_repeats"])
        )

        # ------------------------------------------------------------------- evaluation
        say("evaluation: batched vs batch size 1")
        report.add(
            "eval", pipeline.eval_section(test_x, test_y, device, sizes["eval_fast_images"], sizes["eval_plain_images"])
        )

        # ------------------------------------------------------------------- fp32 against bf16 (CPU)
        if not on_cuda:
            say("CPU: fp32 against bf16, full AlexNet, training and evaluation")
            report.add(
                "precision",
                precision_figures.precision_section(
                    common.cores(), sizes["precision_steps"], sizes["precision_eval_images"]
                ),
            )

        # ------------------------------------------------------------------- every model
        say("models: training images/s of each model, its recipe, 32x32 and its own image size")
        report.add("models", model_figures.models_section(args.quick))

        # ------------------------------------------------------------------- weight exchange
        say("weight exchange: full AlexNet there and back through fedshard.runtime.transport")
        report.add("exchange", exchange.exchange_section(sizes["exchange_repeats"]))

        # ------------------------------------------------------------------- one real experiment
        n = sizes["experiment_images"]
        report.add(
            "experiment",
            experiment.experiment_section(
                tmp / "data", tmp, train_x[:n], train_y[:n], device, sizes["experiment_rounds"], sizes["local_repeats"]
            ),
        )

        # ------------------------------------------------------------------- startup, full-size files
        report.add("startup", experiment.startup_section(tmp, device.type))

        # ------------------------------------------------------------------- extension
        if not args.no_sweeps:
            say("sweeps: rounds 2 and 4, two seeds, from scratch and with extension")
            report.add("extension", experiment.extension_section(tmp / "data", tmp, sizes["sweep_images"], device.type))

        if on_cuda:
            cuda(report, args, device, sizes)

    report.finish()
    print(report.text())
    if args.json:
        report.write(args.json)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
