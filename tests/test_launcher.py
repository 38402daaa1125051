"""The launcher's own ends, with real processes and a real store where they are cheap: a signal
that comes during the teardown, a start that fails before the run, the kernel's parent-death
request, and a run's end without PyTorch. A whole experiment's faults are in test_faults.py."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from fedshard import tracking
from fedshard.core import checkpoint
from fedshard.core.config import ExperimentConfig
from fedshard.runtime import launcher, processes
from helpers import assert_gone


@pytest.fixture
def workdirs(tmp_path, monkeypatch):
    """The launcher's work directories land under this test's directory; what is left of them."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return lambda: sorted(tmp_path.glob("fedshard-*"))


def test_a_signal_during_the_teardown_ends_the_run_killed_and_cleans_up(data_dir, store, workdirs, monkeypatch):
    """A sweep cancels while the launcher tears a failed experiment down (its grace wait): the run
    is KILLED with the reason, nothing is left, and no traceback escapes (a real metaserver)."""
    children = []

    def start(exp, run_id, hand=0):
        children.extend(c.proc.pid for c in exp.children)
        raise processes.ExperimentFailed("trainer 0 died (killed by SIGKILL)")

    teardown = processes.Experiment.teardown

    def interrupted_teardown(exp):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in the middle of the teardown
        teardown(exp)

    monkeypatch.setattr(processes.Experiment, "start", start)
    monkeypatch.setattr(processes.Experiment, "teardown", interrupted_teardown)
    cfg = ExperimentConfig(data_dir=str(data_dir), world_size=1, rounds=1, precision="fp32")
    lines = []
    code = launcher.run(cfg, lambda: tracking.start_run(cfg, "teardown"), echo=lines.append, progress_every=0)
    assert code == 128 + signal.SIGTERM, lines
    run = MlflowClient().search_runs([tracking.experiment_id("teardown")])[0]
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.FAILURE_TAG] == (
        "interrupted by SIGTERM (tearing down after: trainer 0 died (killed by SIGKILL))"
    )
    assert lines[-1].startswith(f"fedshard: run {run.info.run_id} KILLED: interrupted by SIGTERM")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back
    assert children and workdirs() == []
    assert_gone(children, run.info.run_id)


def test_a_second_signal_is_ignored_and_a_first_one_raises_only_until_the_teardown():
    with launcher._Signals() as signals:
        with pytest.raises(launcher.Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs in the main thread between bytecodes: here
        os.kill(os.getpid(), signal.SIGTERM)  # a second one: nothing happens
    assert signals.signum == signal.SIGINT
    with launcher._Signals() as signals:
        signals.raising = False  # tearing down
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)
    assert signals.signum == signal.SIGHUP


@pytest.mark.parametrize("failing", ["checkpoint", "experiment"])
def test_the_work_directory_goes_when_the_start_fails(tmp_path, workdirs, monkeypatch, failing):
    def no_space(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    start = None
    if failing == "checkpoint":  # a resume or an extension writes its start checkpoint (220 MB) first
        monkeypatch.setattr(checkpoint, "save", no_space)
        start = SimpleNamespace(checkpoint=None, copied_rounds=0)
    else:
        monkeypatch.setattr(launcher, "Experiment", no_space)
    with pytest.raises(OSError, match="No space left"):
        launcher.run(ExperimentConfig(), lambda: pytest.fail("no run may be opened"), start=start)
    assert workdirs() == []


def test_a_child_whose_parent_died_before_the_request_starts_nothing():
    """The parent-death request of a child that outlived its parent between fork and prctl would
    never fire: the preexec_fn ends the child instead of starting it."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is no parent of anything
    processes._prctl()  # looked up here, in the parent, as the preexec functions do
    for sig, unblock in ((signal.SIGTERM, True), (signal.SIGKILL, False)):
        child = subprocess.Popen(
            ["sleep", "30"], preexec_fn=functools.partial(processes._die_with, gone.pid, sig, unblock)
        )
        assert child.wait(timeout=10) == 128 + sig
    alive = subprocess.Popen(["sleep", "0.1"], preexec_fn=processes.preexec_launcher())  # this process: alive
    assert alive.wait(timeout=10) == 0


@pytest.mark.slow
def test_a_run_ends_without_importing_pytorch(tmp_path, store):
    """The launcher deletes a FINISHED run's checkpoints by their names: importing PyTorch for that
    would add 1.5 s to every run."""
    script = """
import sys
from pathlib import Path
from fedshard import tracking
from fedshard.runtime import launcher
from mlflow.tracking import MlflowClient
run_id = MlflowClient().create_run(tracking.experiment_id("notorch")).info.run_id
for r in (1, 2):
    Path(f"round-0000{r}.pt").write_bytes(b"x")
    MlflowClient().log_artifact(run_id, f"round-0000{r}.pt", "checkpoint")
assert tracking.checkpoint_rounds(run_id) == [2, 1]
tracking.delete_checkpoints(run_id)
assert tracking.checkpoint_rounds(run_id) == [] and MlflowClient().list_artifacts(run_id) == []
print("torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
