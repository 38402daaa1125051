"""Results CSVs (fedshard.results.formats), the paired comparisons and rounds to target
(fedshard.results.analysis) and the report (fedshard.results.report, `fedshard analyze`), checked against
numbers computed here by hand with numpy/scipy on a hand-made CSV."""

from __future__ import annotations

import csv
import math
import pickle

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from fedshard import cli
from fedshard.core import files
from fedshard.results import analysis, report
from fedshard.results import formats as results
from test_analyze_cli import analyze

SEEDS = (1, 2, 3)
# Test accuracy of rounds 0..3 per (world_size, strategy, enable_swapping) and seed. C3 peaks
# before its last round (best 0.40, final 0.38); E (centralised) has one seed and knows no bytes.
CURVES = {
    (2, "tensor_parallel", False): {
        1: [0.01, 0.20, 0.33, 0.40],
        2: [0.01, 0.25, 0.40, 0.44],
        3: [0.01, 0.30, 0.42, 0.48],
    },  # A
    (2, "tensor_parallel", True): {
        1: [0.01, 0.27, 0.45, 0.50],
        2: [0.01, 0.30, 0.48, 0.52],
        3: [0.01, 0.35, 0.50, 0.54],
    },  # B
    (2, "fedavg", False): {1: [0.01, 0.15, 0.25, 0.30], 2: [0.01, 0.18, 0.27, 0.31], 3: [0.01, 0.20, 0.40, 0.38]},  # C
    (1, "tensor_parallel", False): {1: [0.01, 0.10, 0.15, 0.20]},  # E
}
# Bytes exchanged per round (down, up); None: unknown (a run from before bytes were logged).
BYTES = {
    (2, "tensor_parallel", False): (1_000_000, 1_000_000),
    (2, "tensor_parallel", True): (1_250_000, 1_250_000),
    (2, "fedavg", False): (2_000_000, 2_000_000),
    (1, "tensor_parallel", False): None,
}
CONSTANT = {
    "learning_rate": "0.001",
    "rounds": "3",
    "local_epochs": "1",
    "batch_size": "64",
    "swap_every": "2",
    "partition": "iid",
    "dirichlet_alpha": "0.5",
    "max_train_samples": "0",
    "max_test_samples": "0",
    "init_from": "",
    "precision": "fp32",
}


def write_csv(path):
    """The hand-made file, in CSV_COLUMNS layout, written with the csv module (not fedshard's)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=results.CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for (ws, strategy, swap), runs in CURVES.items():
            for seed, accs in runs.items():
                for r, acc in enumerate(accs):
                    row = {
                        **CONSTANT,
                        "world_size": ws,
                        "strategy": strategy,
                        "enable_swapping": swap,
                        "seed": seed,
                        "run_id": f"run-{ws}-{strategy}-{swap}-{seed}",
                        "round": r,
                        "test_loss": round(4.6 - r, 2),
                        "test_accuracy": repr(acc),
                    }
                    if BYTES[(ws, strategy, swap)]:
                        down, up = BYTES[(ws, strategy, swap)]
                        row.update(bytes_down=down * (r > 0), bytes_up=up * (r > 0), bytes_total=(down + up) * r)
                    writer.writerow(row)
    return path


A, B, C, E = CURVES


def final(config):
    return np.array([accs[-1] for accs in CURVES[config].values()])


def best(config):
    return np.array([max(accs) for accs in CURVES[config].values()])


def by_hand_interval(d):
    d = np.asarray(d, dtype=float)
    half = stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def by_hand_target(config, target):
    """(mean first round at or above target over the seeds reaching it, reached, mean bytes there)."""
    rounds = [int(np.argmax(np.array(a) >= target)) for a in CURVES[config].values() if max(a) >= target]
    per_round = sum(BYTES[config]) if BYTES[config] else math.nan
    mean = np.mean(rounds) if rounds else math.nan
    return mean, len(rounds), mean * per_round if rounds else math.nan


# Defaults: 50/75/90 % of the best mean final accuracy (B's, 0.52), rounded: 0.26, 0.39, 0.47.
DEFAULT_TARGETS = [round(f * final(B).mean(), 2) for f in (0.5, 0.75, 0.9)]


def comparison(table, metric, setting, **context):
    """The one row comparing `setting` in this context (the other settings' values, as the CSV spells them)."""
    rows = table[(table["metric"] == metric) & (table["setting"] == setting)].to_dict("records")
    (row,) = [r for r in rows if all(text(r[s]) == text(v) for s, v in context.items())]
    return row


def text(*values):
    """Values as the CSV spells them, so that the function's frame and the read-back CSV compare alike."""
    return tuple(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values)


def check_comparisons(table):
    """Swap false->true at tensor_parallel, fedavg->tensor_parallel without swap (and with it: swapping
    does not apply to FedAvg), world size 1->2 (one common seed: no interval) with and without swap and
    with FedAvg (one trainer is one experiment whatever the strategy), for both metrics."""
    assert DEFAULT_TARGETS == [0.26, 0.39, 0.47]
    for metric, value in (("final_accuracy", final), ("best_accuracy", best)):
        assert len(table[(table["metric"] == metric) & (table["setting"] == "enable_swapping")]) == 1
        assert len(table[(table["metric"] == metric) & (table["setting"] == "strategy")]) == 2
        assert len(table[(table["metric"] == metric) & (table["setting"] == "world_size")]) == 3
        swap = comparison(table, metric, "enable_swapping")
        assert text(swap["value_a"], swap["value_b"], swap["world_size"], swap["strategy"]) == (
            "False",
            "True",
            "2",
            "tensor_parallel",
        )
        assert swap["n"] == 3
        assert [swap["mean_difference"], swap["ci_low"], swap["ci_high"]] == pytest.approx(
            by_hand_interval(value(B) - value(A))
        )
        strategy = comparison(table, metric, "strategy", enable_swapping=False)
        assert text(strategy["value_a"], strategy["value_b"], strategy["enable_swapping"]) == (
            "fedavg",
            "tensor_parallel",
            "False",
        )
        assert [strategy["mean_difference"], strategy["ci_low"], strategy["ci_high"]] == pytest.approx(
            by_hand_interval(value(A) - value(C))
        )
        swapping = comparison(table, metric, "strategy", enable_swapping=True)
        assert swapping["mean_difference"] == pytest.approx(by_hand_interval(value(B) - value(C))[0])
        for config, context in (
            (A, dict(enable_swapping=False, strategy="tensor_parallel")),
            (B, dict(enable_swapping=True, strategy="tensor_parallel")),
            (C, dict(enable_swapping=False, strategy="fedavg")),
        ):
            world = comparison(table, metric, "world_size", **context)
            assert text(world["value_a"], world["value_b"], world["n"]) == ("1", "2", "1")
            assert world["mean_difference"] == pytest.approx(value(config)[0] - value(E)[0])
            assert pd.isna(world["ci_low"]) and pd.isna(world["ci_high"])
    # the best-accuracy rows differ where C3 peaked early
    assert comparison(table, "best_accuracy", "strategy", enable_swapping=False)["mean_difference"] != pytest.approx(
        comparison(table, "final_accuracy", "strategy", enable_swapping=False)["mean_difference"]
    )


def check_targets(table, targets):
    assert sorted(set(table["target"])) == pytest.approx(targets)
    for config in CURVES:
        ws, strategy, swap = config
        for target in targets:
            (row,) = table[
                (table["world_size"] == ws)
                & (table["strategy"] == strategy)
                & (table["enable_swapping"] == swap)
                & np.isclose(table["target"], target)
            ].to_dict("records")
            rounds, reached, bytes_ = by_hand_target(config, target)
            assert (row["reached"], row["n"]) == (reached, len(CURVES[config])), (config, target)
            assert row["rounds_to_target"] == pytest.approx(rounds, nan_ok=True), (config, target)
            assert row["bytes_to_target"] == pytest.approx(bytes_, nan_ok=True), (config, target)


@pytest.mark.slow
def test_comparisons_and_targets_through_the_functions(tmp_path):
    frame = results.read(write_csv(tmp_path / "hand.csv"))
    check_comparisons(analysis.comparisons(frame))
    assert analysis.default_targets(frame) == DEFAULT_TARGETS
    check_targets(analysis.targets_table(frame, DEFAULT_TARGETS), DEFAULT_TARGETS)
    # E never reaches 0.26, C never 0.47: said so in both places
    lines = report.console_lines(report.tables(frame))
    assert any("never (0/1 seeds)" in line and "0.26" in line for line in lines)
    assert any("never (0/3 seeds)" in line and "fedavg" in line and "0.47" in line for line in lines)


@pytest.mark.slow
def test_analyze_command_on_the_hand_made_csv(tmp_path):
    write_csv(tmp_path / "hand.csv")
    result = analyze("--results-file", "hand.csv", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("Loaded 10 experiments (4 configurations) from hand.csv\n")
    ranking = out.split("Top 5 Configurations by Final Accuracy:\n")[1].splitlines()[:5]
    assert ranking[0] == (
        "1. World Size: 2, LR: 0.001, Swap: True, Rounds: 3, Strategy: tensor_parallel, Accuracy: 0.5200 ± 0.0200 (n=3)"
    )
    assert ranking[3] == (
        "4. World Size: 1, LR: 0.001, Swap: False, Rounds: 3, Strategy: tensor_parallel, Accuracy: 0.2000 (n=1)"
    )  # one seed: no spread
    assert ranking[4] == ""
    assert "Batch Size" not in out and "Partition" not in out  # constant settings are not shown
    assert "default targets 0.26, 0.39, 0.47" in out and "never (0/1 seeds)" in out
    check_comparisons(pd.read_csv(tmp_path / "out" / "comparisons.csv", dtype={"value_a": str, "value_b": str}))
    check_targets(pd.read_csv(tmp_path / "out" / "targets.csv"), DEFAULT_TARGETS)
    md = (tmp_path / "out" / "report.md").read_text()
    for name in (
        "comparisons.csv",
        "targets.csv",
        "learning_curves.png",
        "accuracy_vs_lr.png",
        "swap_comparison.png",
        "best_accuracy_vs_rounds.png",
        "accuracy_vs_bytes.png",
    ):
        assert f"- [{name}]({name})" in md
        assert (tmp_path / "out" / name).stat().st_size > 0
        assert f"out/{name}" in out
    assert "never (0/3 seeds)" in md and "| n/a (n < 2) |" in md and "### Best accuracy" in md
    assert "default targets 0.26, 0.39, 0.47" in md


@pytest.mark.slow
def test_target_option_replaces_the_defaults(tmp_path):
    write_csv(tmp_path / "hand.csv")
    result = analyze(
        "--results-file",
        "hand.csv",
        "--output-dir",
        "out",
        "--target",
        "0.3",
        "--target",
        "0.45,0.5",
        "--no-plots",
        "false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "targets given: 0.30, 0.45, 0.50" in result.stdout and "default targets" not in result.stdout
    check_targets(pd.read_csv(tmp_path / "out" / "targets.csv"), [0.3, 0.45, 0.5])


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "0 is not in (0, 1]"),
        ("1.5", "1.5 is not in (0, 1]"),
        ("x", "'x' is not a number"),
        ("0.3,nan", "nan is not in (0, 1]"),
    ],
)
def test_a_bad_target_is_a_usage_error(tmp_path, monkeypatch, value, message):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "experiment_results.pkl")
    result = CliRunner().invoke(cli.main, ["analyze", "--target", value])
    assert result.exit_code == 2
    assert "Invalid value for '--target'" in result.stderr and message in result.stderr
    assert not (tmp_path / "plots").exists()


def test_an_empty_target_means_the_defaults(tmp_path, monkeypatch):
    """MLproject passes --target '' when no target is given."""
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "experiment_results.pkl")
    result = CliRunner().invoke(cli.main, ["analyze", "--target", "", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "default targets 0.26, 0.39, 0.47" in result.stdout
    assert not (tmp_path / "plots").exists()  # --no-plots: no file at all


def test_formats_are_told_apart_by_content_not_name(tmp_path):
    as_pkl = results.read(write_csv(tmp_path / "really_a_csv.pkl"))
    assert len(as_pkl) == 40 and as_pkl["strategy"].tolist().count("fedavg") == 12
    classic = {(2, 0.001, True, 3, 1): [(0, 4.6, 0.01), (1, 4.0, 0.5)]}
    (tmp_path / "really_a_pickle.csv").write_bytes(pickle.dumps(classic))
    assert results.pickle_dict(results.read(tmp_path / "really_a_pickle.csv")) == classic


def test_frames_round_trip_through_both_formats(tmp_path):
    path = write_csv(tmp_path / "hand.csv")
    frame = results.read(path)
    assert frame["init_from"].tolist() == [""] * 40 and set(frame["precision"]) == {"fp32"}
    assert frame["bytes_total"].isna().sum() == 4  # E's rounds
    again = results.read(files.write_atomic(tmp_path / "again.csv", results.csv_bytes(frame)))
    pd.testing.assert_frame_equal(again, frame)
    classic = results.pickle_dict(frame.drop(columns="strategy").query("world_size == 1"))
    assert classic == {(1, 0.001, False, 3, 1): [(0, 4.6, 0.01), (1, 3.6, 0.1), (2, 2.6, 0.15), (3, 1.6, 0.2)]}
    assert [type(v) for v in next(iter(classic))] == [int, float, bool, int, int]
    text = results.csv_bytes(results.frame_from_pickle(classic)).decode().splitlines()
    assert text[0] == ",".join(results.CSV_COLUMNS)
    assert text[1] == "1,0.001,False,3,1" + "," * (len(results.CSV_COLUMNS) - 10) + "0,4.6,0.01,,,"
    assert (
        results.pickle_dict(results.read(files.write_atomic(tmp_path / "classic.csv", "\n".join(text).encode())))
        == classic
    )
    with pytest.raises(results.ResultsError, match="differ in strategy"):
        results.pickle_dict(frame)  # A and C share their five key settings


def test_a_csv_missing_columns_names_them(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("world_size,learning_rate,enable_swapping,rounds,seed,round\n2,0.001,True,3,1,0\n")
    with pytest.raises(
        results.ResultsError,
        match=r"short.csv: not a results CSV: it has no column test_loss, "
        r"test_accuracy",
    ):
        results.read(path)
    path.write_text(
        "world_size,learning_rate,enable_swapping,rounds,seed,round,test_loss,test_accuracy\n"
        "2,0.001,yes,3,1,0,4.6,0.01\n"
    )
    with pytest.raises(results.ResultsError, match="line 2: enable_swapping is 'yes', expected True or False"):
        results.read(path)


def test_one_seed_shows_no_spread(tmp_path):
    frame = results.read(write_csv(tmp_path / "hand.csv"))
    summary = analysis.summarize(frame)
    assert summary["final_accuracy_std"].isna().tolist() == [False, False, False, True]
    shown = report.summary_display(summary)
    cells = dict(zip(shown["World Size"], shown["Final Acc (mean ± std)"]))
    assert cells["1"] == "0.2000" and "±" in shown["Final Acc (mean ± std)"].iloc[-1]


def test_write_report_returns_every_file(tmp_path):
    frame = results.read(write_csv(tmp_path / "hand.csv"))
    paths = report.write_report(frame, tmp_path / "out", targets=[0.3], plots=False)
    assert [p.name for p in paths] == ["report.md", "comparisons.csv", "targets.csv"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    md = paths[0].read_text()
    assert "targets given: 0.30" in md and ".png" not in md


def test_every_difference_equal_gives_a_point_interval():
    n, mean, low, high = analysis.paired_interval(pd.Series([0.25, 0.25, 0.25]))
    assert (n, mean, low, high) == (3, 0.25, 0.25, 0.25)
    assert analysis.paired_interval(pd.Series([0.25]))[2:] == (pytest.approx(math.nan, nan_ok=True),) * 2


def test_the_tables_compute_each_run_once(tmp_path, monkeypatch):
    frame = results.read(write_csv(tmp_path / "hand.csv"))
    calls = []
    real = analysis.per_run
    monkeypatch.setattr(analysis, "per_run", lambda r: calls.append(r) or real(r))
    t = report.tables(frame)
    report.console_lines(t)
    report.markdown(t, [])
    assert len(calls) == 1
    pd.testing.assert_frame_equal(t.summary, analysis.summarize(frame))


def test_bytes_are_shown_in_one_unit_choice():
    assert [analysis.bytes_text(b) for b in (512, 2_500, 2_500_000, 4e9)] == ["512 B", "2.5 kB", "2.5 MB", "4.0 GB"]
    assert analysis.byte_unit(2_500_000) == ("MB", 1e6)
