"""`fedshard analyze`: any results pickle in the classic format, no MLflow at all; a bad file is a
clear error (exit 2), never a traceback."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pandas as pd
import pytest
from click.testing import CliRunner

from fedshard import cli
from fedshard.results.plots import PLOT_FILES
from helpers import REPO


def curve(final_accs, rounds=3):
    """Rounds 0..rounds, accuracy rising linearly to `final`."""
    return [(r, 4.6 - r * 0.5, final_accs * r / rounds) for r in range(rounds + 1)]


# Mean final accuracy per configuration (seeds averaged), written down by hand:
#   (2, 0.001, True, 3)   0.50, 0.60 -> 0.55
#   (1, 0.0001, False, 3) 0.40       -> 0.40
#   (2, 0.001, False, 3)  0.30, 0.40 -> 0.35
#   (2, 1e-05, True, 3)   0.10       -> 0.10
RESULTS = {
    (2, 1e-05, True, 3, 123): curve(0.10),
    (2, 0.001, False, 3, 123): curve(0.30),
    (2, 0.001, False, 3, 456): curve(0.40),
    (1, 0.0001, False, 3, 123): curve(0.40),
    (2, 0.001, True, 3, 123): curve(0.50),
    (2, 0.001, True, 3, 456): curve(0.60),
}


def analyze(*args, cwd):
    """The real command, in its own process, with no MLflow store anywhere in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "fedshard", "analyze", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.slow
def test_analyze_ranks_a_hand_made_pickle_and_writes_the_plots(tmp_path):
    results = tmp_path / "hand_made.pkl"
    results.write_bytes(pickle.dumps(RESULTS))
    result = analyze("--results-file", str(results), "--output-dir", "figs", "--top", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    ranking = result.stdout.split("Top 3 Configurations by Final Accuracy:\n")[1].splitlines()[:4]
    assert [line.split(", Accuracy")[0] for line in ranking[:3]] == [
        "1. World Size: 2, LR: 0.001, Swap: True, Rounds: 3",
        "2. World Size: 1, LR: 0.0001, Swap: False, Rounds: 3",
        "3. World Size: 2, LR: 0.001, Swap: False, Rounds: 3",
    ]
    assert "Accuracy: 0.5500 ± 0.0707 (n=2)" in ranking[0]
    assert ranking[3] == "" or not ranking[3].startswith("4.")
    for name in PLOT_FILES:
        assert (tmp_path / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list(tmp_path.glob("mlflow.db")) and not (tmp_path / "mlruns").exists()


def test_no_plots_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiment_results.pkl").write_bytes(pickle.dumps(RESULTS))
    for args in (["--no-plots"], ["--no-plots", "true"]):  # the flag, and MLproject's form
        result = CliRunner().invoke(cli.main, ["analyze", *args])
        assert result.exit_code == 0, result.output
        assert "Top 5 Configurations by Final Accuracy:" in result.stdout
        assert not (tmp_path / "plots").exists()


BAD = {
    "empty": (b"", "the file is empty"),
    "not a pickle": (b"key,value\n1,2\n", "not a results pickle"),
    "empty dict": (pickle.dumps({}), "the results dict is empty"),
    "wrong key types": (pickle.dumps({("2", 0.001, True, 3, 1): curve(0.1)}), "world_size is str '2', expected int"),
    "rounds out of order": (pickle.dumps({(2, 0.001, True, 3, 1): curve(0.1)[::-1]}), "expected round 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_pickle_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch, case):
    content, message = BAD[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.pkl").write_bytes(content)
    result = CliRunner().invoke(cli.main, ["analyze", "--results-file", "bad.pkl"])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("fedshard: error: bad.pkl: ") and message in result.stderr
    assert not (tmp_path / "plots").exists()


@pytest.mark.slow
def test_a_missing_file_through_the_real_command(tmp_path):
    result = analyze("--results-file", "nowhere.pkl", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "fedshard: error: nowhere.pkl: no such results file"
    assert "Traceback" not in result.stdout + result.stderr


def test_mlproject_analyze_uses_the_same_command():
    import yaml

    entry = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["analyze"]
    assert entry["command"].split()[:2] == ["fedshard", "analyze"]


NAN = float("nan")
# A diverged run logs NaN. Every accuracy NaN (the reproduction), and one seed of two diverged.
ALL_DIVERGED = {(2, 0.001, True, 1, 123): [(0, 4.6, NAN), (1, 4.5, NAN)]}
ONE_SEED_DIVERGED = {
    (2, 0.001, True, 2, 1): [(0, 4.6, 0.01), (1, 3.0, 0.30), (2, 2.5, 0.40)],
    (2, 0.001, True, 2, 2): [(0, 4.6, 0.01), (1, 3.0, 0.35), (2, NAN, NAN)],
    (2, 0.001, False, 2, 1): [(0, 4.6, 0.01), (1, 4.0, 0.10), (2, 3.5, 0.20)],
    (2, 0.001, False, 2, 2): [(0, 4.6, 0.01), (1, 4.0, 0.10), (2, 3.5, 0.22)],
}
REPORT_FILES = ["report.md", "comparisons.csv", "targets.csv", *PLOT_FILES]


@pytest.mark.parametrize(
    "results, fmt",
    [(ALL_DIVERGED, "pickle"), (ALL_DIVERGED, "csv"), (ONE_SEED_DIVERGED, "pickle")],
    ids=["all diverged", "all diverged, csv", "one seed diverged"],
)
def test_nan_accuracies_give_a_complete_report(tmp_path, monkeypatch, results, fmt):
    from fedshard.results import formats

    monkeypatch.chdir(tmp_path)
    (tmp_path / "nan.pkl").write_bytes(
        pickle.dumps(results) if fmt == "pickle" else formats.csv_bytes(formats.frame_from_pickle(results))
    )
    result = CliRunner().invoke(cli.main, ["analyze", "--results-file", "nan.pkl", "--output-dir", "rep"])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "rep").iterdir())
    expected = [f for f in REPORT_FILES if f != "swap_comparison.png" or results is ONE_SEED_DIVERGED]
    assert written == sorted(expected)
    for name in written:
        assert f"- [{name}]({name})" in (tmp_path / "rep" / "report.md").read_text() or name == "report.md"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "runs diverged" in md and "kept out of every mean" in md and "figures leave diverged runs out" in md
    assert "Accuracy: nan" not in result.stdout and " nan " not in result.stdout.replace("NaN", "")
    if results is ALL_DIVERGED:
        assert (
            "1. World Size: 2, LR: 0.001, Swap: True, Rounds: 1, Accuracy: none (1 of 1 seeds diverged)"
            in result.stdout
        )
        assert "no default targets: every run diverged" in md and "(nothing to draw: every run diverged)" in md


def test_a_diverged_seed_is_counted_shown_kept_out_of_the_mean_and_ranked_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nan.pkl").write_bytes(pickle.dumps(ONE_SEED_DIVERGED))
    result = CliRunner().invoke(cli.main, ["analyze", "--results-file", "nan.pkl", "--no-plots"])
    assert result.exit_code == 0, result.output
    ranking = result.stdout.split("Top 5 Configurations by Final Accuracy:\n")[1].splitlines()[:2]
    # swap's one finite seed (0.40) beats no swap's mean (0.21), yet a diverged seed ranks it last
    assert ranking == [
        "1. World Size: 2, LR: 0.001, Swap: False, Rounds: 2, Accuracy: 0.2100 ± 0.0141 (n=2)",
        "2. World Size: 2, LR: 0.001, Swap: True, Rounds: 2, Accuracy: 0.4000 (n=1; 1 of 2 seeds diverged)",
    ]
    summary = result.stdout.split("Top 5")[0]
    (swap_row,) = [line for line in summary.splitlines() if " True " in line]
    assert swap_row.split()[4:8] == ["0.0100", "0.4000", "1", "1"] and "of 2" in swap_row  # start, mean, n, "1 of 2"
    # the comparison pairs only seed 1: the diverged seed 2 is not in it
    comparison = result.stdout.split("Paired comparisons, final accuracy")[1].splitlines()[2]
    assert comparison.split()[-6:] == ["1", "+0.2000", "n/a", "(n", "<", "2)"]  # n=1, 0.40 - 0.20, no interval


def test_an_output_dir_that_is_a_file_is_refused_before_anything_is_shown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.pkl").write_bytes(pickle.dumps(RESULTS))
    (tmp_path / "rep").write_text("a file")
    for output in ("rep", "rep/inside"):
        result = CliRunner().invoke(cli.main, ["analyze", "--results-file", "r.pkl", "--output-dir", output])
        assert result.exit_code == 2, result.output
        assert result.stderr == f"fedshard: error: --output-dir {output}: rep is a file, not a directory\n"
        assert result.stdout == "" and (tmp_path / "rep").read_text() == "a file"


def test_a_6_tuple_pickle_gets_a_layerwise_column_and_comparison(tmp_path, monkeypatch):
    from test_analysis import LAYERWISE

    monkeypatch.chdir(tmp_path)
    (tmp_path / "harness.pkl").write_bytes(pickle.dumps(LAYERWISE))
    result = CliRunner().invoke(cli.main, ["analyze", "--results-file", "harness.pkl", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert (
        "1. World Size: 1, LR: 0.0001, Swap: False, Rounds: 2, Layerwise: False, Accuracy: 0.4000 (n=1)"
        in result.stdout
    )  # world size 1 as fedshard records it: layerwise swapping does not apply
    final = result.stdout.split("Paired comparisons, final accuracy")[1].split("\n\n")[0].splitlines()
    (row,) = [line.split() for line in final if line.split()[:3] == ["Layerwise", "False", "True"]]
    # on − off per seed: 0.10 − 0.20, 0.12 − 0.24; mean −0.11, half width t(0.975, 1) · 0.01414 / √2
    half = 12.7062 * 0.01
    assert row[-4:] == ["2", "-0.1100", f"[{-0.11 - half:+.4f},", f"{-0.11 + half:+.4f}]"]
    # world size 1 -> 2 with layerwise swapping too (world size 1 stands in: it does not apply there): seed 42
    (world,) = [
        line.split() for line in final if line.split()[:4] == ["World", "Size", "1", "2"] and line.split()[7] == "True"
    ]
    assert world[8:10] == ["1", "-0.3000"]
    from fedshard.results import report, sources

    md = report.markdown(report.tables(sources.read_sources(["harness.pkl"])[0]), [])
    assert "| Layerwise |" in md and "highest over the trained rounds (r ≥ 1" in md and "Start Acc (round 0)" in md


def test_two_results_files_compare_their_sources(tmp_path, monkeypatch):
    """Does fedshard reproduce my numbers? One command: the harness's file and fedshard's, paired by seed."""
    monkeypatch.chdir(tmp_path)
    harness = {(2, 0.001, True, 3, seed): curve(0.50 + 0.01 * seed) for seed in (1, 2, 3)}
    ours = {(2, 0.001, True, 3, seed): curve(0.48 + 0.01 * seed + 0.01 * (seed == 3)) for seed in (1, 2, 3)}
    (tmp_path / "experiment_results_random.pkl").write_bytes(pickle.dumps(harness))
    (tmp_path / "ours.pkl").write_bytes(pickle.dumps(ours))
    result = CliRunner().invoke(
        cli.main,
        [
            "analyze",
            "--results-file",
            "experiment_results_random.pkl",
            "--results-file",
            "ours.pkl",
            "--label",
            "fedshard=ours.pkl",
            "--no-plots",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Source: experiment_results_random, Accuracy: 0.5200 ± 0.0100 (n=3)" in result.stdout
    final = result.stdout.split("Paired comparisons, final accuracy")[1].split("\n\n")[0].splitlines()
    (row,) = [line.split() for line in final if line.split()[0] == "Source"]
    # a < b by name; b − a = fedshard − harness per seed: −0.02, −0.02, −0.01
    assert row[1:3] == ["experiment_results_random", "fedshard"] and row[-4:-2] == ["3", "-0.0167"]

    for args, message in (
        (
            ["--results-file", "ours.pkl", "--results-file", "sub/ours.pkl"],
            "several results files are named ours; tell them apart with --label NAME=FILE",
        ),
        (
            ["--results-file", "ours.pkl", "--label", "x=other.pkl"],
            "--label 'x=other.pkl': other.pkl is not one of the results files given",
        ),
        (["--results-file", "ours.pkl", "--label", "ours.pkl"], "expected NAME=FILE"),
    ):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / "ours.pkl").write_bytes(pickle.dumps(ours))
        refused = CliRunner().invoke(cli.main, ["analyze", *args, "--no-plots"])
        assert refused.exit_code == 2 and message in refused.stderr, refused.output
    # what a pickle does not record is taken from the other files' runs, and said; where they differ, refused
    from fedshard.results import formats as results
    from fedshard.results import sources

    csv = results.frame_from_pickle(ours).assign(strategy="tensor_parallel", init_from="")
    (tmp_path / "ours.csv").write_bytes(results.csv_bytes(csv))
    frame, notes = sources.read_sources(["experiment_results_random.pkl", "ours.csv"])
    assert notes == [
        "experiment_results_random.pkl records no strategy, init_from: its runs are taken to have the "
        "other files' strategy=tensor_parallel, init_from=''"
    ]
    assert set(frame["strategy"]) == {"tensor_parallel"} and set(frame["source"]) == {
        "experiment_results_random",
        "ours",
    }
    (tmp_path / "ours.csv").write_bytes(results.csv_bytes(pd.concat([csv, csv.assign(strategy="fedavg")])))
    with pytest.raises(
        results.ResultsError,
        match=r"experiment_results_random.pkl records no strategy, and the runs "
        r"of the other files differ in it \(fedavg, tensor_parallel\)",
    ):
        sources.read_sources(["experiment_results_random.pkl", "ours.csv"])
    from test_analysis import LAYERWISE

    (tmp_path / "six.pkl").write_bytes(pickle.dumps(LAYERWISE))
    frame, notes = sources.read_sources(["experiment_results_random.pkl", "six.pkl"])
    assert notes == [
        "experiment_results_random.pkl records no enable_layerwise_swapping: its runs are read as "
        "enable_layerwise_swapping=false, as a 5-tuple pickle, like any file from before the setting "
        "existed, holds runs without it"
    ]
    assert not frame.loc[frame["source"] == "experiment_results_random", "enable_layerwise_swapping"].any()
    # files given one label are one source: the harness's study in two files
    one = CliRunner().invoke(
        cli.main,
        [
            "analyze",
            "--results-file",
            "ours.pkl",
            "--results-file",
            "sub/ours.pkl",
            "--label",
            "a=ours.pkl",
            "--label",
            "a=sub/ours.pkl",
            "--no-plots",
        ],
    )
    assert one.exit_code == 2 and "is in more than one file of source 'a'" in one.stderr
