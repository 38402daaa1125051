"""ResNet-34 through real processes: a tiny sweep (world sizes 1 and 2, with and without swapping)
finishes, moves the bytes its slicing table predicts and logs a loadable ResNet; a run whose
trainer is killed resumes to the same history as that sweep's uninterrupted run. Tiny: 32 x 32
images (the model's own 224 is checked in test_models.py), batch 8, 32 training images, 3 rounds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from fedshard import tracking
from fedshard.core import data, models, sharding, training
from fedshard.runtime import transport
from helpers import REPO, Launcher, assert_gone, fedshard

pytestmark = pytest.mark.slow  # every test here starts processes

SETTINGS = dict(
    model="resnet34",
    image_size=32,
    batch_size=8,
    local_epochs=1,
    max_train_samples=32,
    max_test_samples=16,
    precision="fp32",
)
ROUNDS = 3
METRICS = ("test_loss", "test_accuracy", "train_loss")


def histories(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    return {m: {x.step: x.value for x in client.get_metric_history(run_id, m)} for m in METRICS}


@pytest.fixture(scope="module")
def resnet_sweep(data_dir, _empty_store, tmp_path_factory):
    """One sweep of ResNet-34 in a store of its own: world size 1, and 2 with and without swapping,
    three at once. -> (store uri, {(world_size, swapping): run}), the runs as MLflow returns them."""
    root = tmp_path_factory.mktemp("resnet-sweep")
    shutil.copyfile(_empty_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "MLFLOW_TRACKING_URI": uri,
        "TMPDIR": str(root),
    }
    params = [a for k, v in {**SETTINGS, "data_dir": data_dir}.items() for a in ("-P", f"{k}={v}")]
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "sweep.py"),
            "--world-sizes",
            "1,2",
            "--swap",
            "false,true",
            "--learning-rates",
            "1e-2",
            "--rounds",
            str(ROUNDS),
            "--seeds",
            "123",
            "--parallel",
            "3",
            *params,
            "--experiment-name",
            "resnet",
            "--no-progress",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(uri)
    runs = [
        r
        for r in client.search_runs([client.get_experiment_by_name("resnet").experiment_id])
        if r.data.tags.get("fedshard.sweep") != "true"
    ]
    return uri, {(int(r.data.params["world_size"]), r.data.params["enable_swapping"] == "true"): r for r in runs}


def test_tiny_resnet34_runs_finish_at_world_sizes_1_and_2_with_and_without_swapping(
    resnet_sweep, data_dir, monkeypatch
):
    uri, runs = resnet_sweep
    client = MlflowClient(uri)
    assert set(runs) == {(1, False), (2, False), (2, True)}
    resnet = models.get("resnet34")
    for (world_size, swapping), run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.info.run_name.startswith(f"ws{world_size}-lr0.01-swap{str(swapping).lower()}-r3-s123-resnet34-")
        assert {k: run.data.params[k] for k in ("model", "optimizer", "image_size", "local_epochs")} == {
            "model": "resnet34",
            "optimizer": "sgd",
            "image_size": "32",
            "local_epochs": "1",
        }
        found = histories(client, run.info.run_id)
        assert sorted(found["test_loss"]) == [0, 1, 2, 3] and sorted(found["train_loss"]) == [1, 2, 3]
        assert run.data.params["model.params_full"] == "21335972"
        # Each trainer received its slice, parameters and buffers: what the slicing table says it holds.
        widths = [resnet.slice_widths(world_size, k) for k in range(world_size)]
        words = [sum(transport.word_count(t) for t in resnet.shapes(w).state_dict().values()) for w in widths]
        slices = {k: int(run.data.metrics[f"trainer_{k}/slice"]) for k in range(world_size)}
        for k, part in slices.items():
            assert run.data.metrics[f"trainer_{k}/bytes_down"] == 4 * words[part] + 24
        assert run.data.metrics["comm/bytes_down"] == sum(4 * w + 24 for w in words)
    # Swapping rotates the slices every swap_every (2) rounds: in round 3 (the last) trainer 0 trains slice 1.
    assert client.get_metric_history(runs[2, True].info.run_id, "trainer_0/slice")[-1].value == 1
    assert client.get_run(runs[2, False].info.run_id).data.metrics["trainer_0/slice"] == 0
    # What a tensor-parallel round moves against the whole model (the table's 50.6 %: test_models.py).
    state = resnet.shapes().state_dict()
    full_words = sum(transport.word_count(t) for t in state.values())
    split = sum(transport.word_count(t) for k, t in state.items() if isinstance(sharding.rule(resnet.table(), k), int))
    assert runs[2, True].data.metrics["comm/bytes_down"] == 4 * (split + 2 * (full_words - split)) + 2 * 24

    # The final model is a ResNet that gives the last round's accuracy, from images as it evaluates them.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pytorch.load_model(f"runs:/{runs[2, True].info.run_id}/model")
    assert type(model).__name__ == "ResNet" and model.layer1[0].bn1.num_batches_tracked.item() == ROUNDS * 2
    images, labels = data.load_split(data_dir, "test", SETTINGS["max_test_samples"])
    prep = training.Preprocessing.of("resnet34", 32)
    with torch.no_grad():
        out = model.eval()(training.evaluation_input(torch.from_numpy(images), prep))
    accuracy = (out.argmax(1) == torch.from_numpy(labels)).double().mean().item()
    assert accuracy == pytest.approx(runs[2, True].data.metrics["test_accuracy"])


def test_a_killed_resnet34_run_resumes_to_the_history_of_an_uninterrupted_one(tmp_path, data_dir, store, resnet_sweep):
    uri, runs = resnet_sweep
    reference = histories(MlflowClient(uri), runs[2, True].info.run_id)
    exp = Launcher(
        tmp_path,
        data_dir,
        "resume",
        world_size=2,
        enable_swapping=True,
        rounds=ROUNDS,
        seed=123,
        learning_rate=1e-2,
        **SETTINGS,
    )
    deadline = time.monotonic() + 180
    # Round 1 is stored: kill a trainer. Rounds here take a second or two, so by the time it dies round 2
    # may be stored too; either way the run stops before round 3.
    while tracking.run_record(exp.run_id).checkpoint_round < 1:
        assert exp.proc.poll() is None and time.monotonic() < deadline, "".join(exp.output)
        time.sleep(0.1)
    os.kill(exp.trainers[0], signal.SIGKILL)
    exp.finish(timeout=60)
    assert exp.proc.returncode == 1 and tracking.run_record(exp.run_id).status == "FAILED"
    assert_gone(exp.children(), exp.run_id)
    stored = tracking.run_record(exp.run_id).checkpoint_round
    assert stored in (1, 2), stored
    result = fedshard("run", "--resume", exp.run_id, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 1/3" not in result.stdout and "round 3/3" in result.stdout
    assert ("round 2/3" in result.stdout) == (stored == 1)  # no stored round trained again
    run = MlflowClient().get_run(exp.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.RESUMED_TAG] == str(stored)
    assert histories(MlflowClient(), exp.run_id) == reference
    assert tracking.RunRecord.of(run).config().identity() == tracking.RunRecord.of(runs[2, True]).config().identity()
