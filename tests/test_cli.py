"""The user-facing entry points: MLproject forwards every parameter, `mlflow run` works, and bad
input fails fast with a clear message, no process started and no run left RUNNING."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from fedshard.cli import run as run_command
from fedshard.core.config import ExperimentConfig, field_names
from helpers import REPO, experiment_args, fedshard, fedshard_processes


def mlproject():
    return yaml.safe_load((REPO / "MLproject").read_text())


def test_mlproject_forwards_every_parameter_to_the_cli():
    main = mlproject()["entry_points"]["main"]
    command = main["command"]
    options = {opt for p in run_command.params for opt in p.opts}
    defaults = ExperimentConfig()
    for name, spec in main["parameters"].items():
        flag = f"--{name.replace('_', '-')}"
        assert f"{flag} {{{name}}}" in command, f"{name} is not forwarded"
        assert flag in options, f"{flag} is not an option of fedshard run"
        if name == "no_duplicate":  # the one parameter that is no experiment setting
            assert run_command.make_context("run", [flag, spec["default"]]).params[name] is False
            continue
        assert name in field_names()
        if spec["default"] != "":
            parsed = ExperimentConfig.from_mapping({name: spec["default"]})
            assert parsed.params()[name] == defaults.params()[name], f"{name}: MLproject default differs"
    # every {placeholder} in the command is a declared parameter
    assert set(re.findall(r"\{(\w+)\}", command)) == set(main["parameters"])
    # every experiment setting is a parameter, a new one too: derived from the config, not listed here
    missing = [name for name in field_names() if name not in main["parameters"]]
    assert not missing, f"MLproject's main entry point lacks {missing}"


def test_every_config_field_is_an_option_of_fedshard_run():
    options = {p.name for p in run_command.params}
    assert set(field_names()) <= options


@pytest.mark.slow
def test_mlflow_run_logs_into_its_run_with_canonical_params_from_a_registered_model(tmp_path, data_dir, store):
    import mlflow

    from fedshard import tracking
    from fedshard.core import data, precision
    from fedshard.core.models.alexnet import AlexNet
    from fedshard.core.training import DeviceData, evaluate

    torch.manual_seed(99)  # weights no seed of an experiment would produce
    weights = AlexNet().state_dict()
    client = MlflowClient()
    source = client.create_run(client.create_experiment("init")).info.run_id
    tracking.log_model(source, weights, "alexnet")  # as an experiment stores its final model
    version = mlflow.register_model(f"runs:/{source}/model", "start-here").version
    # init_from takes a state-dict file, runs:/<id>/model and models:/<name>/<version> alike
    torch.save(weights, tmp_path / "w.pt")
    for uri in (str(tmp_path / "w.pt"), f"runs:/{source}/model"):
        loaded = tracking.load_weights(uri)
        assert all(torch.equal(loaded[k], weights[k]) for k in weights), uri
    params = [
        "-P",
        f"data_dir={data_dir}",
        "-P",
        "world_size=2",
        "-P",
        "rounds=1",
        "-P",
        "learning_rate=0.00001",
        "-P",
        "max_train_samples=32",
        "-P",
        "max_test_samples=16",
        "-P",
        "batch_size=16",
        "-P",
        "local_epochs=1",
        "-P",
        f"init_from=models:/start-here/{version}",
    ]
    # A FINISHED twin of it: `mlflow run` runs it again (repeats can be on purpose), naming the twin first.
    twin_cfg = ExperimentConfig(
        data_dir=str(data_dir),
        world_size=2,
        rounds=1,
        learning_rate=1e-5,
        max_train_samples=32,
        max_test_samples=16,
        batch_size=16,
        local_epochs=1,
        init_from=f"models:/start-here/{version}",
    )
    twin = tracking.start_run(twin_cfg, "mlp", tags=tracking.claims.claim_tags(twin_cfg, tracking.claims.HELD))
    tracking.end_run(twin, "FINISHED")
    mlflow = Path(sys.executable).with_name("mlflow")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [str(mlflow), "run", str(REPO), "--env-manager", "local", "--experiment-name", "mlp", *params],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"fedshard: note: this configuration already has FINISHED run {twin} (experiment 'mlp'); running it "
        f"again" in result.stdout.splitlines()[0]
    )
    runs = client.search_runs([client.get_experiment_by_name("mlp").experiment_id])
    assert len(runs) == 2  # fedshard logged into the run `mlflow run` made, not a third one
    (run,) = [r for r in runs if r.info.run_id != twin]
    assert run.info.status == "FINISHED"
    # MLflow logged precision=auto before fedshard started; what it computed in is the tag (and the config
    # read back from the run), and bf16 would be in its name
    computed = precision.resolve("auto", "cpu")
    assert run.data.params["precision"] == "auto" and run.data.tags["fedshard.core.precision"] == computed
    assert tracking.run_record(run.info.run_id).config().precision == computed
    # named by what it is in the UI's run table, not like languid-bear-729
    assert run.info.run_name == "ws2-lr1e-05-swaptrue-r1-s123-ep1-bs16-train32-test16-init" + "-bf16" * (
        computed == "bf16"
    )
    assert ExperimentConfig.from_mapping({"learning_rate": run.data.params["learning_rate"]}).learning_rate == 1e-5
    assert run.data.params["enable_swapping"] == "true"  # a bool MLproject passes as a string, canonical
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test_loss")}
    assert sorted(history) == [0, 1]
    # Round 0 is the model it was told to start from, the registered model.
    model = AlexNet()
    model.load_state_dict(weights)
    expected, _ = evaluate(
        model,
        DeviceData.from_numpy(*data.load_split(data_dir, "test", 16), torch.device("cpu")),
        bf16=computed == "bf16",
    )
    assert history[0] == pytest.approx(expected, rel=1e-5)


BAD_INPUTS = [
    ({"world_size": 0}, "world_size=0: must be an integer >= 1"),
    ({"world_size": 97}, "world_size=97: tensor_parallel slicing allows 1..96"),
    ({"learning_rate": 0}, "learning_rate=0.0: must be a finite number > 0"),
    ({"learning_rate": -0.1}, "learning_rate=-0.1: must be a finite number > 0"),
    ({"rounds": 0}, "rounds=0: must be an integer >= 1"),
    ({"strategy": "gossip"}, "strategy='gossip': must be one of tensor_parallel, fedavg"),
    ({"partition": "random"}, "partition='random': must be one of iid, contiguous, dirichlet"),
    ({"world_size": 65, "max_train_samples": 64}, "world_size=65: cannot split N=64 samples into n=65"),
    ({"enable_swapping": "maybe"}, "Invalid value for '--enable-swapping': 'maybe' is not a valid boolean"),
    ({"rounds": "ten"}, "Invalid value for '--rounds': 'ten' is not a valid integer"),
    ({"dirichlet_alpha": 0}, "dirichlet_alpha=0.0: must be a finite number > 0"),
    ({"batch_size": -4}, "batch_size=-4: must be an integer >= 1 (0: the model's own)"),
    ({"model": "vgg"}, "model='vgg': must be one of alexnet, resnet34"),
    ({"image_size": 16}, "image_size=16: must be an integer >= 32"),
    ({"optimizer": "rmsprop"}, "optimizer='rmsprop': must be one of adam, sgd"),
    ({"local_epochs": -1}, "local_epochs=-1: must be an integer >= 1"),
    ({"swap_every": 0}, "swap_every=0: must be an integer >= 1"),
    ({"seed": -1}, "seed=-1: must be an integer >= 0"),
    ({"max_test_samples": -1}, "max_test_samples=-1: must be >= 0 (0 means all)"),
    ({"round_timeout": 0}, "round_timeout=0.0: must be a number of seconds > 0"),
    ({"device": "tpu"}, "device='tpu': must be one of auto, cpu, cuda"),
]


@pytest.mark.parametrize("params,message", BAD_INPUTS, ids=[m.split(":")[0] for _, m in BAD_INPUTS])
def test_bad_input_is_refused_with_the_value_and_what_is_valid(tmp_path, data_dir, shared_store, params, message):
    from click.testing import CliRunner

    from fedshard.cli import main

    result = CliRunner().invoke(main, ["run", *experiment_args(data_dir, **params), "--experiment-name", "bad"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "aggregator pid" not in result.stdout  # no process was started
    exp = MlflowClient().get_experiment_by_name("bad")
    assert exp is None or MlflowClient().search_runs([exp.experiment_id]) == []


@pytest.mark.slow
def test_bad_input_from_the_shell_exits_within_seconds_without_traceback(tmp_path, data_dir, store):
    start = time.monotonic()
    result = fedshard("run", *experiment_args(data_dir, learning_rate=0), "--experiment-name", "bad", cwd=tmp_path)
    assert result.returncode == 2
    assert "fedshard: error: invalid experiment configuration" in result.stderr
    assert "learning_rate=0.0: must be a finite number > 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 30
    assert fedshard_processes(str(tmp_path)) == []
    assert MlflowClient().get_experiment_by_name("bad") is None


def write_corrupt_dataset(root: Path) -> Path:
    from fedshard.core.synthetic import write_synthetic_cifar100

    folder = write_synthetic_cifar100(root, n_train=16, n_test=16)
    train = folder / "train"
    train.write_bytes(train.read_bytes()[:500])  # truncated, as by an interrupted copy
    return root


@pytest.mark.parametrize("case", ["missing", "corrupt", "init_from_missing", "init_from_not_weights"])
@pytest.mark.slow
def test_bad_data_and_weights_name_the_file(tmp_path, data_dir, shared_store, case):
    args = {"world_size": 1}
    expect = {
        "missing": "place cifar-100-python.tar.gz",
        "corrupt": "not a valid CIFAR-100 python file",
        "init_from_missing": "init_from=",
        "init_from_not_weights": "is not a fedshard alexnet state dict: 20 missing keys (conv1.weight, conv1.bias, "
        "conv2.weight, conv2.bias, conv3.weight, ...); 1 unexpected key (layer.weight)",
    }[case]
    if case == "missing":
        args["data_dir"] = tmp_path / "nowhere"
    elif case == "corrupt":
        args["data_dir"] = write_corrupt_dataset(tmp_path / "corrupt")
    elif case == "init_from_missing":
        args["init_from"] = tmp_path / "no-such-weights.pt"
    else:
        bad = tmp_path / "other.pt"
        torch.save({"layer.weight": torch.zeros(3)}, bad)
        args["init_from"] = bad
    data = args.pop("data_dir", data_dir)
    result = fedshard("run", *experiment_args(data, **args), "--experiment-name", "bad", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expect.lower() in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr
    exp = MlflowClient().get_experiment_by_name("bad")
    assert exp is None or MlflowClient().search_runs([exp.experiment_id]) == []


@pytest.mark.slow
def test_no_duplicate_refuses_a_configuration_that_finished_or_runs_elsewhere(tmp_path, data_dir, store):
    """A FINISHED run of the configuration (this one recorded before claims: found by its params) and a
    live claim of it: --no-duplicate names both and refuses, exit 2, before any run or process is left."""
    from fedshard import tracking

    client = MlflowClient()
    cfg = ExperimentConfig.from_mapping(
        {
            **dict(
                world_size=1,
                data_dir=str(data_dir),
                max_train_samples=64,
                max_test_samples=32,
                batch_size=16,
                local_epochs=1,
                learning_rate=1e-4,
                precision="fp32",
            )
        }
    )
    finished = client.create_run(tracking.experiment_id("dup")).info.run_id
    tracking.log_extra_params(finished, {**cfg.params(), "learning_rate": "0.00010"})  # spelled as `mlflow run` may
    client.set_terminated(finished, "FINISHED")
    running = tracking.start_run(cfg, "dup", tags=tracking.claims.claim_tags(cfg, tracking.claims.HELD))  # ours, live
    result = fedshard(
        "run", *experiment_args(data_dir, world_size=1), "--experiment-name", "dup", "--no-duplicate", cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        f"fedshard: error: --no-duplicate: this configuration already has FINISHED run {finished}; it is running "
        f"elsewhere: run {running} (pid {os.getpid()} on {tracking.host()}, heartbeat "
    ) in result.stderr
    assert "aggregator pid" not in result.stdout and "Traceback" not in result.stderr
    assert len(client.search_runs([tracking.experiment_id("dup")])) == 2  # no run was created
    assert fedshard_processes(str(tmp_path)) == []  # the metaserver, already starting, was stopped again


@pytest.mark.slow
def test_bad_input_under_mlflow_run_marks_its_run_failed(tmp_path, data_dir, store):
    """`mlflow run` creates the run before fedshard starts: bad input must not leave it RUNNING."""
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("outer")).info.run_id
    env = dict(os.environ, MLFLOW_RUN_ID=run_id)
    result = subprocess.run(
        [sys.executable, "-m", "fedshard", "run", *experiment_args(data_dir, rounds=0)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "rounds=0" in run.data.tags["fedshard.failure_reason"]
