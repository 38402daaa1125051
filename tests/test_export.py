"""`fedshard export`: the classic results pickle (and a tidy CSV) from FINISHED runs only, with
exact Python types, rounds in order, newest run winning, and atomic writes. Runs are made
directly in a real SQLite store here; test_sweep.py exports runs made by real experiments."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from fedshard import cli, tracking
from fedshard.core import files
from fedshard.core.config import RESULT_SETTINGS
from fedshard.results import export
from fedshard.results.formats import ResultsError, pickle_dict, read


def make_run(
    experiment, status="FINISHED", losses=(), accs=(), steps=None, start_time=None, tags=None, **params
) -> str:
    """A run as fedshard logs one; metrics are logged last round first, to check the ordering."""
    client = MlflowClient()
    run_id = client.create_run(tracking.experiment_id(experiment), start_time=start_time, tags=tags or {}).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    steps = list(range(len(losses))) if steps is None else steps
    metrics = [
        Metric(name, value, 1000 + step, step)
        for step, loss, acc in zip(steps, losses, accs)
        for name, value in (("test_loss", loss), ("test_accuracy", acc))
    ]
    if metrics:
        client.log_batch(run_id, metrics=metrics[::-1])
    client.set_terminated(run_id, status)
    return run_id


def invoke(*args):
    return CliRunner().invoke(cli.main, ["export", *args])


KEY = dict(world_size=2, learning_rate="0.00001", enable_swapping="True", rounds=2, seed=123)


def test_export_builds_the_classic_pickle_from_finished_runs_only(tmp_path, store):
    make_run("exp", losses=[4.6, 3.0, 2.5], accs=[0.01, 0.2, 0.3], **KEY)
    # world_size 1: swapping does not apply, so it is False in the key whatever was logged
    make_run(
        "exp",
        losses=[4.6, 4],
        accs=[0.0, 0.5],
        world_size=1,
        learning_rate="1e-3",
        enable_swapping="true",
        rounds=1,
        seed=7,
        data_dir="'/my data'",
    )
    make_run("exp", "KILLED", losses=[4.6], accs=[0.0], **{**KEY, "seed": 1})
    make_run("exp", "FAILED", **{**KEY, "seed": 2})
    make_run("exp", tags={"fedshard.sweep": "true"}, world_sizes="1,2", rounds="30,50")  # a sweep's parent
    incomplete = make_run("exp", losses=[4.6, 3.0], accs=[0.0, 0.1], **{**KEY, "rounds": 3})
    output = tmp_path / "out" / "results.pkl"

    result = invoke("--experiment-name", "exp", "--output", str(output))
    assert result.exit_code == 0, result.output
    assert "Exported 2 finished runs (2 configurations) of experiment 'exp'" in result.stdout
    assert (
        f"warning: run {incomplete} left out: test_loss has rounds 0, 1, expected 0..3 (missing 2, 3)" in result.stderr
    )

    results = pickle.loads(output.read_bytes())
    assert results == {
        (1, 0.001, False, 1, 7): [(0, 4.6, 0.0), (1, 4.0, 0.5)],
        (2, 1e-05, True, 2, 123): [(0, 4.6, 0.01), (1, 3.0, 0.2), (2, 2.5, 0.3)],
    }
    assert type(results) is dict
    for key, entries in results.items():
        assert [type(v) for v in key] == [int, float, bool, int, int]
        assert type(entries) is list
        for entry in entries:
            assert type(entry) is tuple and [type(v) for v in entry] == [int, float, float]
        assert [r for r, _, _ in entries] == list(range(key[3] + 1))


def test_newest_finished_run_wins_with_a_warning(tmp_path, store):
    old = make_run("dup", losses=[4.6, 3.0, 2.0], accs=[0.0, 0.1, 0.2], start_time=1_000, **KEY)
    new = make_run(
        "dup",
        losses=[4.6, 2.9, 1.9],
        accs=[0.0, 0.3, 0.4],
        start_time=2_000,
        **{**KEY, "learning_rate": "1e-05", "enable_swapping": "true"},
    )
    make_run("dup", "FAILED", start_time=3_000, **KEY)  # newer still, but not finished
    result = invoke("--experiment-name", "dup", "--output", str(tmp_path / "r.pkl"))
    assert result.exit_code == 0, result.output
    assert f"using the newest, {new} (replaces {old})" in result.stderr
    assert pickle.loads((tmp_path / "r.pkl").read_bytes()) == {
        (2, 1e-05, True, 2, 123): [(0, 4.6, 0.0), (1, 2.9, 0.3), (2, 1.9, 0.4)]
    }


def test_csv_is_one_tidy_row_per_run_and_round(tmp_path, store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = make_run("tidy", losses=[4.6, 3.0, 2.5], accs=[0.01, 0.2, 0.3], **KEY)
    b = make_run(
        "tidy",
        losses=[4.6, 4.0],
        accs=[0.0, 0.5],
        world_size=1,
        learning_rate="1e-3",
        enable_swapping="false",
        rounds=1,
        seed=7,
    )
    result = invoke("--experiment-name", "tidy", "--format", "csv")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "experiment_results.csv", keep_default_na=False, na_values=[""])
    assert list(frame.columns) == [
        *RESULT_SETTINGS,
        "run_id",
        "round",
        "test_loss",
        "test_accuracy",
        "bytes_down",
        "bytes_up",
        "bytes_total",
    ]
    assert list(frame.columns)[:5] == ["world_size", "learning_rate", "enable_swapping", "rounds", "seed"]
    assert len(frame) == 5
    assert set(frame["strategy"]) == {"tensor_parallel"} and frame["bytes_total"].isna().all()  # not counted
    assert frame["enable_swapping"].dtype == bool and frame["learning_rate"].dtype == float
    rows = frame.sort_values(["run_id", "round"])
    assert rows[rows.run_id == a]["test_accuracy"].tolist() == [0.01, 0.2, 0.3]
    assert rows[rows.run_id == b][["world_size", "learning_rate", "round"]].values.tolist() == [
        [1, 0.001, 0],
        [1, 0.001, 1],
    ]


@pytest.mark.parametrize("breaks", ["replace", "write"])
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path, store, monkeypatch, breaks):
    make_run("atomic", losses=[4.6, 3.0, 2.5], accs=[0.01, 0.2, 0.3], **KEY)
    output = tmp_path / "experiment_results.pkl"
    output.write_bytes(b"the previous results")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(files.os, "replace" if breaks == "replace" else "fsync", broken)
        result = invoke("--experiment-name", "atomic", "--output", str(output))
    assert result.exit_code == 1
    assert "cannot write" in result.stderr and "No space left on device" in result.stderr
    assert output.read_bytes() == b"the previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment_results.pkl", "mlflow.db"]

    assert invoke("--experiment-name", "atomic", "--output", str(output)).exit_code == 0
    assert list(pickle.loads(output.read_bytes())) == [(2, 1e-05, True, 2, 123)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment_results.pkl", "mlflow.db"]


def test_nothing_finished_is_an_error_and_writes_nothing(tmp_path, store):
    make_run("none", "FAILED", **KEY)
    make_run("none", "KILLED", losses=[4.6], accs=[0.0], **KEY)
    output = tmp_path / "r.pkl"
    result = invoke("--experiment-name", "none", "--output", str(output))
    assert result.exit_code == 1
    assert "experiment 'none' has no FINISHED experiment run to export; nothing written" in result.stderr
    assert not output.exists()

    result = invoke("--experiment-name", "typo", "--output", str(output))
    assert result.exit_code == 2  # a name given wrong is bad input
    assert "no experiment 'typo'" in result.stderr and "Default, none" in result.stderr
    assert not output.exists()


def test_output_under_a_file_is_refused_and_missing_folders_are_created_saying_so(tmp_path, store):
    make_run("where-to", losses=[4.6, 3.0, 2.5], accs=[0.01, 0.2, 0.3], **KEY)
    (tmp_path / "notes.txt").write_text("a file")
    result = invoke("--experiment-name", "where-to", "--output", str(tmp_path / "notes.txt" / "r.pkl"))
    assert result.exit_code == 2, result.output
    assert (
        f"cannot write {tmp_path / 'notes.txt' / 'r.pkl'}: {tmp_path / 'notes.txt'} is a file, not a directory; "
        "nothing written" in result.stderr
    )
    assert "File exists" not in result.stderr and (tmp_path / "notes.txt").read_text() == "a file"

    result = invoke("--experiment-name", "where-to", "--output", str(tmp_path / "new" / "deeper" / "r.pkl"))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"Created the folder {tmp_path / 'new' / 'deeper'} (it did not exist)"
    assert (tmp_path / "new" / "deeper" / "r.pkl").is_file()
    again = invoke("--experiment-name", "where-to", "--output", str(tmp_path / "new" / "deeper" / "r.pkl"))
    assert "Created" not in again.stdout


def test_entries_keep_the_last_value_logged_for_a_round():
    loss = [(0, 4.6, 1), (1, 3.0, 2), (1, 2.8, 3)]
    acc = [(1, 0.2, 3), (0, 0.0, 1)]
    assert export.entries_from_history(loss, acc, 1) == [(0, 4.6, 0.0), (1, 2.8, 0.2)]
    with pytest.raises(ValueError, match="test_accuracy has rounds 0, 1, 5, expected 0..1"):
        export.entries_from_history(loss, acc + [(5, 0.3, 4)], 1)


def test_runs_that_differ_outside_the_key_never_mix_and_where_selects(tmp_path, store):
    tp = make_run("mix", losses=[4.6, 3.0], accs=[0.0, 0.2], **{**KEY, "rounds": 1})
    fedavg = make_run("mix", losses=[4.6, 2.0], accs=[0.0, 0.5], strategy="fedavg", **{**KEY, "rounds": 1})
    output = tmp_path / "r.pkl"
    refused = invoke("--experiment-name", "mix", "--output", str(output))
    assert refused.exit_code == 2
    assert "differ in strategy (fedavg, tensor_parallel)" in refused.stderr
    assert "--where strategy=fedavg (or tensor_parallel)" in refused.stderr and not output.exists()

    assert (
        invoke(
            "--experiment-name",
            "mix",
            "--output",
            str(output),
            "--where",
            "strategy=tensor_parallel",
            "--where",
            "learning_rate=0.00001",
        ).exit_code
        == 0
    )
    assert pickle.loads(output.read_bytes()) == {(2, 1e-05, True, 1, 123): [(0, 4.6, 0.0), (1, 3.0, 0.2)]}
    csv = invoke("--experiment-name", "mix", "--format", "csv", "--output", str(tmp_path / "r.csv"))
    assert csv.exit_code == 0, csv.output
    table = pd.read_csv(tmp_path / "r.csv")
    assert table.groupby("strategy")["run_id"].first().to_dict() == {"fedavg": fedavg, "tensor_parallel": tp}


@pytest.mark.parametrize(
    "where, message",
    [
        ("colour=red", "--where 'colour=red': unknown setting 'colour'; valid: world_size, learning_rate"),
        ("data_dir=/d", "unknown setting 'data_dir'"),  # where the data sat is not a setting of a result
        ("strategy", "expected NAME=VALUE"),
        ("strategy=gossip", "strategy='gossip': must be one of tensor_parallel, fedavg"),
        (
            "partition=dirichlet",
            "--where partition=dirichlet: no FINISHED run has it; the runs have partition=contiguous",
        ),
    ],
)
def test_bad_where_exits_2_and_writes_nothing(tmp_path, store, where, message):
    make_run("sel", losses=[4.6, 3.0, 2.5], accs=[0.01, 0.2, 0.3], **KEY)
    output = tmp_path / "r.pkl"
    result = invoke("--experiment-name", "sel", "--output", str(output), "--where", where)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not output.exists()


def test_where_keeps_the_value_given_whatever_the_other_settings_default_to():
    # dirichlet_alpha applies only to partition=dirichlet and the default partition is iid: the value
    # given is still what selects, not the default 0.5 that iid runs record
    assert export.parse_where(["dirichlet_alpha=0.1"]) == {"dirichlet_alpha": "0.1"}
    assert export.parse_where(["learning_rate=0.00001 enable_swapping=yes"]) == {
        "learning_rate": "1e-05",
        "enable_swapping": "true",
    }
    # 128 trainers cannot share AlexNet's 96 conv1 channels, but FedAvg runs them: a world size to select
    assert export.parse_where(["world_size=128"]) == {"world_size": "128"}
    for where, message in (
        ("dirichlet_alpha=abc", "--where 'dirichlet_alpha=abc': dirichlet_alpha='abc': must be a number"),
        ("dirichlet_alpha=-1", "dirichlet_alpha=-1.0: must be a finite number > 0"),
        ("world_size=0", "world_size=0: must be an integer >= 1"),
        ("strategy=weird", "strategy='weird': must be one of tensor_parallel, fedavg"),
    ):
        with pytest.raises(export.SelectionError) as refused:
            export.parse_where([where])
        assert message in str(refused.value)


def test_the_pickle_refusal_is_the_rule_of_results_pickle_dict():
    """Runs under different keys that differ in a setting outside the key are refused too: the
    pickle would not say which run had which strategy."""
    table = pd.DataFrame(
        [
            {
                "world_size": ws,
                "learning_rate": 1e-3,
                "enable_swapping": False,
                "rounds": 1,
                "seed": 1,
                "strategy": strategy,
                "round": 0,
                "test_loss": 4.6,
                "test_accuracy": 0.01,
            }
            for ws, strategy in ((1, "tensor_parallel"), (2, "fedavg"))
        ]
    )
    refusal = export.pickle_refusal(table, "mix")
    assert "differ in strategy (fedavg, tensor_parallel), which the results pickle's key" in refusal
    assert "--where strategy=fedavg (or tensor_parallel)" in refusal
    with pytest.raises(ResultsError, match=r"differ in strategy \(fedavg, tensor_parallel\)"):
        pickle_dict(table)
    assert export.pickle_refusal(table[table["strategy"] == "fedavg"], "mix") is None


def test_key_format_6_writes_the_harness_pickle_that_analyze_reads_back(tmp_path, store):
    make_run("lw", losses=[4.6, 3.0, 2.5], accs=[0.01, 0.2, 0.3], **KEY)
    make_run("lw", losses=[4.6, 3.5, 3.0], accs=[0.01, 0.1, 0.15], enable_layerwise_swapping="true", **KEY)
    output = tmp_path / "lw.pkl"
    refused = invoke("--experiment-name", "lw", "--output", str(output))  # the 5-tuple cannot tell them apart
    assert refused.exit_code == 2 and not output.exists()
    assert "differ in enable_layerwise_swapping (false, true)" in refused.stderr
    assert "the 6-tuple key (--key-format 6) holds enable_layerwise_swapping" in refused.stderr

    assert invoke("--experiment-name", "lw", "--output", str(output), "--key-format", "6").exit_code == 0
    results = pickle.loads(output.read_bytes())
    assert results == {
        (2, 1e-05, True, False, 2, 123): [(0, 4.6, 0.01), (1, 3.0, 0.2), (2, 2.5, 0.3)],
        (2, 1e-05, True, True, 2, 123): [(0, 4.6, 0.01), (1, 3.5, 0.1), (2, 3.0, 0.15)],
    }
    assert all([type(v) for v in key] == [int, float, bool, bool, int, int] for key in results)
    assert pickle_dict(read(output), key_format=6) == results  # read back as it was written
    shown = CliRunner().invoke(cli.main, ["analyze", "--results-file", str(output), "--no-plots"])
    assert shown.exit_code == 0 and "Layerwise: True, Accuracy: 0.1500 (n=1)" in shown.stdout

    # every run with it on is refused too: a 5-tuple pickle is read as layerwise swapping off
    only = invoke("--experiment-name", "lw", "--output", str(output), "--where", "enable_layerwise_swapping=true")
    assert only.exit_code == 2
    assert "have enable_layerwise_swapping=true, which the 5-tuple key cannot say" in only.stderr
    csv = invoke("--experiment-name", "lw", "--format", "csv", "--key-format", "6", "--output", str(tmp_path / "x.csv"))
    assert csv.exit_code == 2 and "--key-format 6: a pickle's key has 5 or 6 fields; a CSV has" in csv.stderr


def test_runs_of_another_model_are_refused_by_name_and_runs_from_before_models_are_alexnet(tmp_path, store):
    # A run recorded before the model settings existed (no model, optimizer or image_size params) is
    # AlexNet with its recipe: selected by --where model=alexnet, kept apart from ResNet-34's runs.
    old = make_run("models", losses=[4.6, 3.0, 2.0], accs=[0.0, 0.2, 0.4], local_epochs=3, batch_size=32, **KEY)
    make_run(
        "models",
        losses=[4.6, 2.5, 1.5],
        accs=[0.0, 0.3, 0.5],
        model="resnet34",
        optimizer="sgd",
        image_size=224,
        local_epochs=1,
        batch_size=32,
        **KEY,
    )
    output = tmp_path / "r.pkl"
    refused = invoke("--experiment-name", "models", "--output", str(output))
    assert refused.exit_code == 2 and "differ in model (alexnet, resnet34)" in refused.stderr, refused.output
    assert not output.exists()
    for where in (["model=alexnet"], ["model=alexnet", "optimizer=adam", "image_size=32"]):
        options = [a for w in where for a in ("--where", w)]
        chosen = invoke("--experiment-name", "models", "--output", str(output), *options)
        assert chosen.exit_code == 0, chosen.output
        assert pickle.loads(output.read_bytes()) == {
            (2, 1e-05, True, 2, 123): [(0, 4.6, 0.0), (1, 3.0, 0.2), (2, 2.0, 0.4)]
        }
    assert (
        invoke(
            "--experiment-name",
            "models",
            "--format",
            "csv",
            "--output",
            str(tmp_path / "r.csv"),
            "--where",
            "model=alexnet",
        ).exit_code
        == 0
    )
    assert set(pd.read_csv(tmp_path / "r.csv")["run_id"]) == {old}
