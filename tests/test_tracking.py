"""fedshard.tracking against a real SQLite store (what concurrent experiments do to it, and where a
new store keeps its artifacts), and against real processes (which one owns a run)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from fedshard import tracking
from fedshard.core.data import DatasetInput
from fedshard.tracking.owners import PID_STARTED_TAG, runs_fedshard


def test_experiments_starting_together_record_the_same_datasets(store):
    """Runs of one sweep read the same test set: each records it, although the store refuses a
    second insert of one dataset (MLflow alone fails 5 of 6 such simultaneous calls here)."""
    client = MlflowClient()
    runs = [client.create_run(tracking.experiment_id("together")).info.run_id for _ in range(6)]
    inputs = [DatasetInput("cifar100-test", "evaluation", "0123456789ab", "/data/test", 10, {"num_rows": 10})]
    barrier, errors = threading.Barrier(len(runs)), []

    def record(run_id):
        barrier.wait()
        try:
            tracking.log_datasets(run_id, inputs)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [[d.dataset.name for d in client.get_run(r).inputs.dataset_inputs] for r in runs] == [["cifar100-test"]] * 6


@pytest.mark.slow
def test_a_new_store_keeps_its_artifacts_beside_it_wherever_it_is_opened_from(tmp_path):
    """A store fedshard creates (here from another directory) puts even its Default experiment's
    artifacts beside the database, not into ./mlruns of the current directory."""
    where, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    where.mkdir()
    elsewhere.mkdir()
    uri = f"sqlite:///{where / 'mlflow.db'}"
    code = "from fedshard import tracking; tracking.ensure_store(); print(tracking.experiment_id('new'))"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(uri)
    for exp_id in ("0", done.stdout.strip()):
        assert client.get_experiment(exp_id).artifact_location == (where / "mlartifacts" / exp_id).as_uri()
    assert list(elsewhere.iterdir()) == []


def test_a_sweep_run_that_mlflow_run_made_is_renamed_for_the_sweep(store, monkeypatch):
    """`mlflow run . -e sweep` names its run like wistful-ant-230; in the UI it carries the sweep's name."""
    client = MlflowClient()
    outer = client.create_run(tracking.experiment_id("named"), run_name="wistful-ant-230").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    run_id, _ = tracking.start_sweep_run("named", "sweep-20261202-120000", {})
    assert run_id == outer and client.get_run(outer).info.run_name == "sweep-20261202-120000"


def test_a_run_goes_to_the_experiment_that_mlflow_experiment_id_names(store, monkeypatch):
    """What `mlflow run --experiment-id` and MLflow's own tools set: the run lands there, not in Default."""
    from fedshard.core.config import ExperimentConfig

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", tracking.experiment_id("by-id"))
    run_id = tracking.start_run(ExperimentConfig(precision="fp32"))
    assert tracking.run_record(run_id).experiment_id == tracking.experiment_id("by-id")


class NotTensors:
    """A pickled object of a class: what torch.save(model) writes, and weights_only=True refuses."""


@pytest.mark.parametrize(
    "content, what",
    [
        (lambda path: path.write_text("not a state dict\n"), "it is no file of torch.save holding tensors only"),
        (
            lambda path: torch.save(torch.nn.Linear(2, 2), path),
            "it holds a pickled torch.nn.modules.linear.Linear object",
        ),
        (lambda path: torch.save({"w": NotTensors()}, path), "it holds a pickled test_tracking.NotTensors object"),
    ],
    ids=["text", "a whole model", "an object"],
)
def test_a_file_that_is_no_state_dict_says_what_is_accepted_never_an_unsafe_load(tmp_path, content, what):
    """torch's own error suggests weights_only=False, which would run whatever the file holds."""
    bad = tmp_path / "bad.pt"
    content(bad)
    with pytest.raises(ValueError) as refused:
        tracking.load_weights(str(bad))
    message = str(refused.value)
    assert message.startswith(
        f"init_from={str(bad)!r}: {bad} is not a state dict: {what}. init_from takes a file of "
        "torch.save(model.state_dict(), PATH)"
    )
    assert "runs:/<run id>/model, models:/<name>/<version> or run:<run name>" in message
    assert "weights_only=False" not in message and "\n" not in message


@pytest.mark.slow
def test_weights_with_the_wrong_keys_name_them_and_count_them(tmp_path):
    from fedshard.core.config import ExperimentConfig
    from fedshard.core.models.alexnet import AlexNet
    from fedshard.runtime.initial import weights as load_initial_weights

    state = AlexNet().state_dict()
    state = {("module." + k if i < 7 else k): v for i, (k, v) in enumerate(state.items())}  # as DataParallel saves
    state["fc4.weight"] = torch.zeros(10, 4096)  # ten classes
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ValueError) as refused:
        load_initial_weights(ExperimentConfig(init_from=str(tmp_path / "w.pt")))
    assert str(refused.value) == (
        f"init_from={str(tmp_path / 'w.pt')!r} is not a fedshard alexnet state dict: 7 missing keys (conv1.weight, "
        "conv1.bias, conv2.weight, conv2.bias, conv3.weight, ...); 7 unexpected keys (module.conv1.weight, "
        "module.conv1.bias, module.conv2.weight, module.conv2.bias, module.conv3.weight, ...); 1 tensor of the wrong "
        "shape (fc4.weight (10, 4096) (expected (100, 4096)))"
    )
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="it holds a list, not a state dict"):
        load_initial_weights(ExperimentConfig(init_from=str(tmp_path / "list.pt")))


def test_a_run_to_start_from_is_the_newest_finished_run_of_that_name_in_the_experiment(store, monkeypatch):
    """init_from=run:<name>: the name says what it is (a configuration), the id which run it was."""
    client = MlflowClient()
    name = "ws1-lr0.0001-swapfalse-r10-s77"

    def run(experiment: str, status: str, run_name: str = name) -> str:
        run_id = client.create_run(tracking.experiment_id(experiment), run_name=run_name).info.run_id
        client.set_terminated(run_id, status)
        return run_id

    run("study", "FINISHED")
    newest = run("study", "FINISHED")
    run("study", "FAILED")
    run("elsewhere", "FINISHED")
    run("study", "FINISHED", run_name=name + "-fedavg")
    assert tracking.source_run(f"run:{name}", "study") == newest
    assert tracking.source_run("runs:/x/model", "study") is None  # not a run named
    with pytest.raises(
        FileNotFoundError,
        match=f"init_from='run:{name}-bs8': experiment 'study' has no FINISHED run named '{name}-bs8'",
    ):
        tracking.source_run(f"run:{name}-bs8", "study")
    monkeypatch.setenv("MLFLOW_RUN_ID", client.create_run(tracking.experiment_id("elsewhere")).info.run_id)
    assert tracking.source_run(f"run:{name}") != newest  # under `mlflow run` or a sweep: the run's experiment


# --- who owns a run ---------------------------------------------------------------------


@pytest.fixture
def spawn():
    """Start a process that lives a minute (killed after the test); returns its psutil.Process."""
    started = []

    def start(*args, **kwargs):
        proc = subprocess.Popen(list(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        started.append(proc)
        process, deadline = psutil.Process(proc.pid), time.monotonic() + 30
        # Until it has exec'd, the child is a copy of pytest, with pytest's command line: wait for its own.
        while process.cmdline()[1:] != list(args)[1:] and time.monotonic() < deadline:
            time.sleep(0.01)
        return process

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def owned_by(pid: int, started: float | None = None, host: str | None = None) -> tracking.RunRecord:
    """A RUNNING run whose owner tags name `pid` (and, unless None, its start time)."""
    tags = {tracking.HOST_TAG: host or socket.gethostname(), tracking.PID_TAG: str(pid)}
    if started is not None:
        tags[PID_STARTED_TAG] = f"{started:.2f}"
    return tracking.RunRecord("r", "0", "RUNNING", 0, {}, tags)


def test_owner_tags_name_this_process_by_pid_and_start_time():
    tags = tracking.owner_tags()
    assert tags[tracking.HOST_TAG] == socket.gethostname() and tags[tracking.PID_TAG] == str(os.getpid())
    assert abs(float(tags[PID_STARTED_TAG]) - psutil.Process().create_time()) < 0.01
    assert tracking.owner_alive(tracking.RunRecord("r", "0", "RUNNING", 0, {}, tags)) is True


def test_a_live_owner_is_recognised_by_pid_and_start_time(spawn):
    owner = spawn("sleep", "60")
    assert tracking.owner_alive(owned_by(owner.pid, owner.create_time())) is True


def test_a_process_that_reuses_the_owners_pid_is_not_the_owner(spawn):
    """The pid is alive, even with fedshard's words in its command line, but the process with it
    started long after the recorded owner did."""
    stranger = spawn(sys.executable, "-c", "import time; time.sleep(60)  # fedshard sweep")
    assert tracking.owner_alive(owned_by(stranger.pid, stranger.create_time() - 600)) is False


def test_an_owner_that_is_gone_or_a_zombie_is_not_alive():
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert tracking.owner_alive(owned_by(gone.pid, 0.0)) is False
    zombie = subprocess.Popen(["true"])  # exits at once, and stays a zombie until waited for
    try:
        proc = psutil.Process(zombie.pid)
        started, deadline = proc.create_time(), time.monotonic() + 10
        while proc.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert tracking.owner_alive(owned_by(zombie.pid, started)) is False
    finally:
        zombie.wait()


def test_an_owner_on_another_host_is_unknown():
    assert tracking.owner_alive(owned_by(os.getpid(), psutil.Process().create_time(), host="elsewhere")) is None


def test_a_run_recorded_without_a_start_time_is_owned_by_a_fedshard_process_only(spawn, tmp_path):
    """Runs from before the start-time tag: the process with the pid must run fedshard itself; words
    in its arguments are not enough."""
    words = spawn(sys.executable, "-c", "import time; time.sleep(60)  # fedshard sweep")
    assert tracking.owner_alive(owned_by(words.pid)) is False
    assert tracking.owner_alive(owned_by(spawn("sleep", "60").pid)) is False
    script = tmp_path / "sweep.py"
    script.write_text("import time\ntime.sleep(60)\n")
    sweep = spawn(sys.executable, str(script), "--rounds", "3")
    assert tracking.owner_alive(owned_by(sweep.pid)) is True


def test_what_runs_fedshard_is_told_by_program_and_script_not_by_words():
    python = sys.executable
    assert runs_fedshard([python, "-m", "fedshard", "sweep"])
    assert runs_fedshard([python, "-u", "-W", "ignore", "-m", "fedshard", "run", "--resume", "abc"])
    assert runs_fedshard([python, "-mfedshard", "run"])
    assert runs_fedshard(["/venv/bin/python3.11", "/venv/bin/fedshard", "run"])  # the console script
    assert runs_fedshard(["fedshard", "sweep"])
    assert runs_fedshard(["python3", "sweep.py", "--seeds", "1"])
    assert not runs_fedshard([python, "-c", "import time; time.sleep(60)  # fedshard sweep"])
    assert not runs_fedshard([python, "-m", "pytest", "tests/test_sweep.py", "-k", "fedshard"])
    assert not runs_fedshard([python, "other.py", "fedshard", "sweep.py"])
    assert not runs_fedshard(["vim", "sweep.py"])
    assert not runs_fedshard(["sleep", "60"])
    assert not runs_fedshard([])


@pytest.mark.slow
def test_loading_a_logged_model_leaves_no_download_behind(store, tmp_path, monkeypatch):
    """Every extension and init_from loads a final model; its 220 MB download must not stay in /tmp."""
    import tempfile

    from fedshard.core.models.alexnet import AlexNet

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    run_id = MlflowClient().create_run(tracking.experiment_id("leak")).info.run_id
    weights = {k: v.clone() for k, v in AlexNet().state_dict().items()}
    tracking.log_model(run_id, weights, "alexnet")
    loaded = tracking.load_weights(f"runs:/{run_id}/model")
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert list((tmp_path / "tmp").iterdir()) == []
