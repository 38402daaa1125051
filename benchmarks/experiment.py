"""What federation costs: a real experiment (`fedshard run`, world size 1) against the same local
training in this process without any federation, and a small sweep with and without extension.

  round_overhead_ratio  the best round_seconds of rounds >= 2 (the aggregator evaluates round r
                        while round r+1 trains, so these exclude evaluation) over the best time of
                        train_local on the same images, threads and batch size in this process.
  startup_seconds       from starting `fedshard run` to the trainer's first training step, with an
                        existing MLflow store (its one-time creation is not startup), in the
                        experiment above: one measurement (common.run_experiment).
  checkpoint_seconds    storing a round's checkpoint in the run's artifacts, as the aggregator
                        measured it (mean of rounds >= 1), in the background of the next round.
  extension_speedup     a sweep with every run from round 0 over the same sweep with each
                        4-round run extending its 2-round twin.
  startup_seconds_full_files
                        startup_seconds with files of CIFAR-100's full size (50,000 + 10,000
                        images, 150 MB), the dataset digests first hashed (every start before the
                        digest cache: "cold") and then read from the cache ("cached"); one
                        one-round experiment each.
"""

from __future__ import annotations

from pathlib import Path

import torch

import common
from common import say
from fedshard.core import models, precision, training
from report import Section


def run_experiment(data_dir: Path, workdir: Path, n_train: int, rounds: int, device: str, **env: str) -> dict:
    """`fedshard run` (world size 1, batch 64, one local epoch, 32 test images) through common.run_experiment;
    returns the run id, startup time and per-round metrics, or raises if the run failed."""
    done, run = common.run_experiment(
        data_dir,
        workdir,
        world_size=1,
        rounds=rounds,
        train_images=n_train,
        test_images=32,
        device=device,
        timeout=1800,
        experiment="bench",
        extra=("--batch-size", "64", "--local-epochs", "1"),
        **env,
    )
    if run is None:
        raise RuntimeError(f"fedshard run failed ({done.code}):\n{done.output[-6000:]}")
    if run["startup_seconds"] is None:
        raise RuntimeError("the trainer's log has no 'first training step' line")
    return run


def bench_local_training(images, labels, device, batch_size: int, repeats: int, bf16: bool) -> dict:
    """train_local over the same images as the experiment's trainer, in this process."""
    data = training.DeviceData.from_numpy(images, labels, device)
    torch.manual_seed(0)
    model = models.get("alexnet").network().to(device)
    warm = training.DeviceData(data.images[: 2 * batch_size], data.labels[: 2 * batch_size])
    training.train_local(
        model,
        warm,
        learning_rate=1e-3,
        epochs=1,
        batch_size=batch_size,
        generator=torch.Generator(device).manual_seed(0),
        bf16=bf16,
    )
    times = []
    for r in range(repeats):
        result = training.train_local(
            model,
            data,
            learning_rate=1e-3,
            epochs=1,
            batch_size=batch_size,
            generator=torch.Generator(device).manual_seed(r),
            bf16=bf16,
        )
        times.append(result.seconds)
    return {"images": len(data), "seconds": times, "best_seconds": min(times)}


def round_figures(exp: dict, local: dict) -> dict:
    best_round = common.best_steady_round(exp["round_seconds"])
    best_trainer = common.best_steady_round(exp["trainer_seconds"])
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


def experiment_section(data_dir: Path, workdir: Path, images, labels, device, rounds: int, repeats: int) -> Section:
    """Local training before and after the experiment, so that both sides sample the machine's load."""
    # in the precision the experiment computes in (precision=auto), so both sides do the same work
    n, bf16 = len(labels), precision.resolve("auto", device.type) == "bf16"
    say(f"local training without federation: {n} images, {repeats} repeats")
    before = bench_local_training(images, labels, device, 64, 1, bf16=bf16)
    say(f"experiment: fedshard run, world_size 1, {rounds} rounds over {n} images")
    exp = run_experiment(data_dir, workdir, n, rounds, device.type)
    say("local training again (so both sides sample the machine's load)")
    after = bench_local_training(images, labels, device, 64, repeats - 1, bf16=bf16)
    local = {"images": n, "seconds": before["seconds"] + after["seconds"]}
    local["best_seconds"] = min(local["seconds"])
    r = round_figures(exp, local)
    details = {
        "run_id": exp["run_id"],
        **r,
        "local_training": local,
        "startup_seconds": exp["startup_seconds"],
        "startup_breakdown": exp["startup_breakdown"],
    }
    figures = {
        "round_overhead_ratio": r["round_overhead_ratio"],
        "startup_seconds": exp["startup_seconds"],
        "checkpoint_seconds": r["checkpoint_seconds"],
    }
    return Section(
        details,
        figures,
        [
            ("round_overhead_ratio", r["round_overhead_ratio"], "x"),
            ("  best round (rounds >= 2)", r["best_round_seconds"], "s"),
            ("  same training, no federation", r["local_training_seconds"], "s"),
            ("  round / trainer's own time", r["round_over_trainer_seconds"], "x"),
            ("checkpoint_seconds (in the background)", r["checkpoint_seconds"], "s"),
            ("startup_seconds", exp["startup_seconds"], "s"),
            *[
                (f"  {k.replace('_spawned_s', '')} process started", v, "s")
                for k, v in exp["startup_breakdown"].items()
            ],
        ],
    )


# ----------------------------------------------------------------------------- startup, full-size files


def startup_section(workdir: Path, device: str) -> Section:
    """One-round experiments reading files of CIFAR-100's full size: first with an empty digest cache
    (the launcher hashes both files, as it did at every start before the cache), then with it."""
    from fedshard.core.synthetic import write_synthetic_cifar100

    data_dir, cache = workdir / "full-size", workdir / "cache"
    say("startup with full-size files: writing 50,000 + 10,000 synthetic images")
    write_synthetic_cifar100(data_dir, n_train=50_000, n_test=10_000, n_classes=100, seed=0)
    seconds = {}
    for name in ("cold", "cached"):
        say(f"startup with full-size files, digests {name}")
        where = workdir / f"startup-{name}"
        where.mkdir()
        seconds[name] = run_experiment(data_dir, where, 64, 1, device, XDG_CACHE_HOME=str(cache))["startup_seconds"]
    figures = {f"startup_seconds_full_files_{k}": v for k, v in seconds.items()}
    return Section(
        figures,
        figures,
        [
            ("startup_seconds_full_files_cold (digests hashed)", seconds["cold"], "s"),
            ("startup_seconds_full_files_cached", seconds["cached"], "s"),
        ],
    )


# ----------------------------------------------------------------------------- extension


def bench_extension(data_dir: Path, workdir: Path, n_train: int, device: str) -> dict:
    """Wall time of one small sweep (world size 2, rounds 2 and 4, two seeds, one experiment at a
    time) run twice in fresh stores: every run from round 0 (12 rounds), and with each longer run
    extending its shorter twin (8 rounds). Both sweeps print their planned rounds."""
    axes = ["--world-sizes", "2", "--learning-rates", "1e-3", "--swap", "true", "--rounds", "2,4", "--seeds", "1,2"]
    out = {}
    for name, extra in (("from_scratch", ["--no-extend"]), ("extended", [])):
        where = workdir / f"sweep-{name}"
        where.mkdir()
        done = common.run_command(
            common.sweep(data_dir, device, n_train, 32, *axes, *extra), 3600, cwd=where, env=common.store_env(where)
        )
        if done.code != 0:
            raise RuntimeError(f"sweep ({name}) failed:\n{done.output[-6000:]}")
        line = next(ln for ln in done.output.splitlines() if ln.startswith("Rounds to train:"))
        out[name] = {"seconds": done.seconds, "rounds_line": line}
    out["extension_speedup"] = out["from_scratch"]["seconds"] / out["extended"]["seconds"]
    return out


def extension_section(data_dir: Path, workdir: Path, n_train: int, device: str) -> Section:
    ext = bench_extension(data_dir, workdir, n_train, device)
    return Section(
        ext,
        {"extension_speedup": ext["extension_speedup"]},
        [
            ("extension_speedup", ext["extension_speedup"], "x"),
            ("  sweep, every run from round 0", ext["from_scratch"]["seconds"], "s"),
            ("  sweep, 4-round runs extend 2-round", ext["extended"]["seconds"], "s"),
        ],
    )
