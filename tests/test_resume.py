"""No finished round is trained twice: real experiments are stopped the hard way (a trainer or the
launcher SIGKILLed, the disk full), continued with `fedshard run --resume`, and must end with exactly
the history of one uninterrupted run (the reference, shared from conftest.py). Bad resumes change
nothing. A sweep's extension of a shorter twin, a lost sweep whose claim is taken over and a paused
owner are in tests/test_several_machines.py, through a tracking server."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from fedshard import cli, tracking
from fedshard.core import precision
from fedshard.core.config import ExperimentConfig
from helpers import CONFIG, Launcher, assert_gone, experiment_args, fedshard, fedshard_processes, history

pytestmark = pytest.mark.slow  # every test here starts processes

NO_NATIVE_BF16 = (
    "this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): fedshard refuses "
    "precision=bf16 here, as PyTorch would emulate it over ten times slower"
)


def wait_for_checkpoint(run_id: str, round_: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while tracking.run_record(run_id).checkpoint_round < round_:
        assert proc.poll() is None and time.monotonic() < deadline, f"no checkpoint of round {round_}"
        time.sleep(0.1)


def resume(tmp_path, run_id: str):
    result = fedshard("run", "--resume", run_id, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def assert_continued_exactly(run_id: str, reference, resumed_from: int):
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.RESUMED_TAG] == str(resumed_from)
    assert run.data.tags[tracking.ROUNDS_TRAINED_TAG] == "3"
    assert tracking.FAILURE_TAG not in run.data.tags
    assert history(run_id) == reference
    assert tracking.checkpoint_rounds(run_id) == []  # the final model is kept, the checkpoint no longer


def test_a_killed_trainer_then_a_sigkilled_launcher_each_leave_a_run_that_resumes_exactly(
    tmp_path, data_dir, store, reference
):
    # A trainer dies after round 1 is stored: the run FAILS, and keeps the checkpoint of round 1 only.
    exp = Launcher(tmp_path, data_dir, "resume", **CONFIG)
    wait_for_checkpoint(exp.run_id, 1, exp.proc)
    os.kill(exp.trainers[1], signal.SIGKILL)
    assert exp.finish() < 15 and exp.proc.returncode == 1
    failed = tracking.run_record(exp.run_id)
    assert failed.status == "FAILED"
    assert failed.tags[tracking.FAILURE_TAG].startswith("trainer 1 died (killed by SIGKILL)")
    assert_gone(exp.children(), exp.run_id)
    assert failed.checkpoint_round == 1 and tracking.checkpoint_rounds(exp.run_id) == [1]

    # Resumed, it trains round 2 (not round 1 again); then its launcher is SIGKILLed. Its children die
    # with it, and the run stays RUNNING with nobody left to end it: stale.
    again = Launcher(tmp_path, data_dir, resume=exp.run_id)
    assert f"fedshard: resuming run {exp.run_id} after round 1 of 3" in "".join(again.output)
    wait_for_checkpoint(exp.run_id, 2, again.proc)
    alive = CliRunner().invoke(cli.main, ["run", "--resume", exp.run_id])  # its owner still runs: refused
    assert alive.exit_code == 2 and f"owner (pid {again.proc.pid} on" in alive.output and "is alive" in alive.output
    meta = [p.pid for p in fedshard_processes(" metaserver ") if p.ppid() == again.proc.pid]
    again.proc.kill()
    again.finish()
    assert_gone(again.children() + meta, exp.run_id)
    stale = tracking.run_record(exp.run_id)
    assert stale.status == "RUNNING" and stale.checkpoint_round == 2
    (left,) = tmp_path.glob("fedshard-*")  # the killed launcher's directory, with its 220 MB start checkpoint

    result = resume(tmp_path, exp.run_id)
    assert not left.exists() and list(tmp_path.glob("fedshard-*")) == []  # the next launcher removed it
    assert "round 1/3" not in result.stdout and "round 2/3" not in result.stdout and "round 3/3" in result.stdout
    assert_continued_exactly(exp.run_id, reference, 2)
    assert fedshard_processes(exp.run_id) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 300 MiB tmpfs: room for one 220 MB checkpoint of AlexNet, not for the next beside it."""
    if os.geteuid() != 0:
        pytest.skip(
            "mounting a tmpfs needs root (CI runs as root); run: sudo .venv/bin/python -m pytest "
            "tests/test_resume.py -k disk"
        )
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_run_with_that_reason_and_the_previous_checkpoint_resumes(
    tmp_path, data_dir, store, reference, small_disk
):
    MlflowClient().create_experiment("full", artifact_location=str(small_disk))
    exp = Launcher(tmp_path, data_dir, "full", **CONFIG)
    exp.finish(timeout=180)
    assert exp.proc.returncode == 1
    failed = tracking.run_record(exp.run_id)
    reason = failed.tags[tracking.FAILURE_TAG]
    assert failed.status == "FAILED" and "round 2: cannot store the checkpoint" in reason, reason
    assert "No space left on device" in reason, reason
    assert failed.checkpoint_round == 1 and tracking.checkpoint_rounds(exp.run_id) == [1]
    assert sorted(tracking.logged_steps(exp.run_id)) == [0, 1]  # round 2 is not in: it was never stored

    subprocess.run(["mount", "-o", "remount,size=2g", str(small_disk)], check=True)  # space again
    resume(tmp_path, exp.run_id)
    assert_continued_exactly(exp.run_id, reference, 1)


def sweep_runs(experiment: str):
    exp = MlflowClient().get_experiment_by_name(experiment)
    runs = MlflowClient().search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("fedshard.sweep") != "true"]


# --------------------------------------------------------------------------- refusals (no processes)


def make_run(experiment: str, status: str, params: dict | None = None, checkpoint: int | None = None) -> str:
    client = MlflowClient()
    run_id = client.create_run(tracking.experiment_id(experiment)).info.run_id
    for k, v in (params or {}).items():
        client.log_param(run_id, k, v)
    if checkpoint is not None:
        client.set_tag(run_id, tracking.CHECKPOINT_TAG, str(checkpoint))
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def snapshot(run_id: str):
    run = MlflowClient().get_run(run_id)
    return run.info.status, run.info.end_time, dict(run.data.tags), dict(run.data.metrics)


@pytest.mark.parametrize(
    "case, message",
    [
        ("finished", "the run is FINISHED, every round is in; nothing to resume"),
        ("foreign", "not a fedshard experiment run"),
        ("no_checkpoint", "the run has no checkpoint"),
        ("missing", "no such run"),
        ("options", "continues the run with its own configuration and experiment; drop --rounds"),
        ("legacy_auto", "recorded on device=auto before fedshard recorded the precision"),
    ],
)
def test_a_run_that_cannot_be_resumed_is_refused_and_left_as_it_was(data_dir, store, case, message):
    params = ExperimentConfig(world_size=1, rounds=2, data_dir=str(data_dir), precision="fp32").params()
    run_id = {
        "finished": lambda: make_run("refuse", "FINISHED", params),
        "foreign": lambda: make_run("refuse", "FAILED", {"alpha": "0.5"}),  # another project's run
        "no_checkpoint": lambda: make_run("refuse", "FAILED", params),
        "missing": lambda: "0123456789abcdef0123456789abcdef",
        "options": lambda: make_run("refuse", "FAILED", params, checkpoint=1),
        # recorded before `precision` existed, on device=auto: bf16 or fp32 cannot be known
        "legacy_auto": lambda: make_run(
            "refuse",
            "FAILED",
            {**{k: v for k, v in params.items() if k != "precision"}, "device": "auto", "amp": "true"},
            checkpoint=1,
        ),
    }[case]()
    before = snapshot(run_id) if case != "missing" else None
    extra = ["--rounds", "5"] if case == "options" else []
    result = CliRunner().invoke(cli.main, ["run", "--resume", run_id, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    if before is not None:
        assert snapshot(run_id) == before


def test_extending_needs_a_finished_shorter_run_of_the_same_configuration(data_dir, store):
    options = experiment_args(data_dir, world_size=1)
    base = cli.run.make_context("run", [*options, "--rounds", "2"]).params
    base = ExperimentConfig.from_mapping({k: v for k, v in base.items() if k in ExperimentConfig.__dataclass_fields__})
    source = make_run("refuse", "FINISHED", base.params())
    running = make_run("refuse", "RUNNING", base.params())
    for args, message in [
        (["--rounds", "2"], "an extension needs more rounds"),
        (["--rounds", "4", "--seed", "9"], "a different configuration: seed=123 (here 9)"),
    ]:
        result = CliRunner().invoke(cli.main, ["run", *options, *args, "--extend", source])
        assert result.exit_code == 2 and message in result.output, result.output
    result = CliRunner().invoke(cli.main, ["run", *experiment_args(data_dir, world_size=1), "--extend", running])
    assert result.exit_code == 2 and "only a FINISHED run can be extended" in result.output
    assert len(MlflowClient().search_runs([tracking.experiment_id("refuse")])) == 2  # no run was created


def test_a_reopened_run_that_cannot_be_prepared_ends_failed_with_the_reason(store):
    """The run is RUNNING again once reopened: logging its checkpoint's metrics failing must end it."""
    from fedshard.core.checkpoint import Checkpoint
    from fedshard.runtime import lifecycle
    from fedshard.runtime.resume import Start

    cfg = ExperimentConfig(world_size=1, rounds=2, precision="fp32")
    run_id = make_run("reopen", "KILLED", cfg.params(), checkpoint=1)
    unloggable = Start(Checkpoint(1, {}, {"bad name!": 0.5}))  # a metric name MLflow refuses
    with pytest.raises(
        lifecycle.StartRefused, match="could not prepare run .*MlflowException: Invalid value"
    ) as refused:
        lifecycle.open_run(cfg, [], resume_id=run_id, start=unloggable)
    assert refused.value.exit_code == 1
    record = tracking.run_record(run_id)
    assert record.status == "FAILED" and record.tags[tracking.FAILURE_TAG] == str(refused.value)


@pytest.mark.parametrize(
    "faster",
    [
        pytest.param(
            dict(device="cuda", deterministic=True, precision="bf16"),
            id="cuda-deterministic-bf16",
            marks=pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device"),
        ),
        pytest.param(
            dict(device="cpu", precision="bf16"),
            id="cpu-bf16",
            marks=pytest.mark.skipif(not precision.cpu_has_native_bf16(), reason=NO_NATIVE_BF16),
        ),
    ],
)
def test_a_bf16_run_reproduces_itself_and_resumes_exactly(tmp_path, data_dir, store, faster):
    """In bf16 (on CUDA with --deterministic, or on a CPU with native bf16, for a fixed number of
    threads): an uninterrupted run, and a run whose trainer is killed after round 1 and which is
    then resumed, give the same history bit for bit; both record that they computed in bf16. Two
    rounds of one step per trainer: the three runs cost the suite less than one of CONFIG."""
    config = dict(CONFIG, rounds=2, max_train_samples=16, max_test_samples=8, batch_size=8, **faster)
    whole = fedshard("run", *experiment_args(data_dir, **config), "--experiment-name", "bf16", cwd=tmp_path)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    (reference_run,) = sweep_runs("bf16")
    exp = Launcher(tmp_path, data_dir, "bf16", **config)
    wait_for_checkpoint(exp.run_id, 1, exp.proc)
    os.kill(exp.trainers[0], signal.SIGKILL)
    exp.finish()
    resume(tmp_path, exp.run_id)
    assert history(exp.run_id) == history(reference_run.info.run_id)
    assert {r.data.params["precision"] for r in sweep_runs("bf16")} == {"bf16"}
