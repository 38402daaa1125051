"""How long a grid would take on one GPU: the one projection both benchmark scripts make, for the
default grid and (gpu_check.py) the harness's.

bench.py and gpu_check.py measure a round in different ways (bench.py from its parts: training
throughput, evaluation throughput and the weight exchange; gpu_check.py as a whole, from a real
full-size run) and hand the seconds of one round per world size to `project`, which lays them over
the default grid as `sweep` would run it and sets them against the one target, TARGET_MINUTES.
"""

from __future__ import annotations

from pathlib import Path

from fedshard.core import models
from fedshard.sweep import grid, planning

# The default grid on one H200 in at most half an hour: what the GPU figures are judged by.
TARGET_MINUTES = 30.0
TARGET_DEVICE = "H200"
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
# A training step costs about 3 forward passes: the forward itself, and a backward pass that
# computes gradients for both the activations and the weights (2 x the forward's arithmetic).
FORWARD_PASSES_PER_TRAINING_STEP = 3
# The grid the researchers' harness ran: world sizes 1, 2, 4, 8 x lr 1e-5, 1e-4, 1e-3 x swap x 10
# rounds x seeds 123, 42, 77 = 63 runs, batch 32, 3 local epochs (fedshard's defaults).
HARNESS = Path(__file__).resolve().parents[1] / "grids" / "harness.yaml"


def training_flops_per_image(
    widths: dict[str, int] | None = None, model: str = "alexnet", image_size: int | None = None
) -> int:
    """FLOPs of training `model` (or one slice of it) on one image at `image_size` (the model's own
    without: AlexNet 32x32, ResNet-34 224x224)."""
    return FORWARD_PASSES_PER_TRAINING_STEP * models.get(model).forward_flops(widths, image_size)


def round_flops(
    world_size: int, images: int = CIFAR_TRAIN, model: str = "alexnet", image_size: int | None = None
) -> float:
    """Training FLOPs of one round over `images`: each of the `world_size` trainers trains its own
    slice of `model` on its own share of the images (one local epoch; project multiplies by a
    run's local epochs)."""
    shares, spec = models.part_sizes(images, world_size), models.get(model)
    return sum(
        training_flops_per_image(spec.slice_widths(world_size, k), model, image_size) * shares[k]
        for k in range(world_size)
    )


def rounds_scaled_by_flops(
    seconds: float,
    measured_world_size: int = 2,
    world_sizes=(1, 2),
    model: str = "alexnet",
    image_size: int | None = None,
) -> dict[int, float]:
    """Seconds of a round for each world size, from one measured at `measured_world_size`: a round
    on one GPU is bound by its arithmetic, so the others take their share of FLOPs longer."""
    measured = round_flops(measured_world_size, model=model, image_size=image_size)
    return {n: seconds * round_flops(n, model=model, image_size=image_size) / measured for n in world_sizes}


def rounds_from_rates(
    train_images_per_s: dict[int, float], eval_images_per_s: float, exchange_gbytes_per_s: float, model_bytes: int
) -> dict[int, float]:
    """Seconds of a round for each world size, from its parts: the trainers share one GPU, so the
    training set takes its size over one slice trainer's images/s (no credit for two trainers
    overlapping); evaluating the test set is added although the aggregator overlaps it with the
    next round's training; the exchange moves the full model (slices add up to it) there and back."""
    fixed = CIFAR_TEST / eval_images_per_s + 2 * model_bytes / (exchange_gbytes_per_s * 1e9)
    return {n: CIFAR_TRAIN / rate + fixed for n, rate in train_images_per_s.items()}


def default_plan() -> planning.Plan:
    """The default 54-run grid as `sweep` plans it, each longer run extending its shorter twin
    (1,350 rounds trained rather than 2,160), each round of 3 local epochs."""
    return planning.plan(grid.expand(grid.make_grid({})), [])


def harness_plan() -> planning.Plan:
    """The harness's 63-run grid (HARNESS) as `sweep` plans it: 630 rounds of 3 local epochs."""
    return planning.plan(grid.expand(grid.make_grid({}, [], HARNESS)), [])


def project(
    round_seconds: dict[int, float], startup_seconds: float, packing_speedup: float, work: planning.Plan | None = None
) -> dict:
    """Minutes for a grid (`work`; the default one unless given) on one GPU: every run pays its
    startup and its rounds, each round `round_seconds` of its world size (a round of one local
    epoch) times its local epochs, at any batch size (a round is taken to cost its images'
    arithmetic: a smaller batch that uses the GPU less well makes this too low); runs packed
    several at a time on the GPU (what `sweep --parallel` does) finish sooner by the measured
    speedup of packing over one at a time."""
    work = work or default_plan()
    serial = sum(
        startup_seconds + task.rounds_to_train * task.cfg.local_epochs * round_seconds[task.cfg.world_size]
        for task in work.tasks
    )
    return {
        "runs": len(work.tasks),
        "rounds": work.rounds_to_train,
        "round_seconds": round_seconds,
        "serial_minutes": serial / 60,
        "packing_speedup": packing_speedup,
        "grid_projected_minutes": serial / packing_speedup / 60,
    }
