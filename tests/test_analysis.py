"""Tests for fedshard.results.analysis: loading/validation, aggregation, ranking, plots (classic pickles;
results CSVs, comparisons and targets are in test_report.py)."""

import collections
import math
import os
import pickle

import matplotlib.pyplot as plt
import pytest

from fedshard.results.analysis import ranking_lines, summarize
from fedshard.results.formats import ResultsError, load_pickle
from fedshard.results.plots import make_plots
from fedshard.results.report import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def curve(accs, losses=None):
    """A run's entries: rounds 0..len(accs)-1 with the given accuracies."""
    losses = losses or [4.6 - 0.5 * r for r in range(len(accs))]
    return [(r, float(loss), float(acc)) for r, (loss, acc) in enumerate(zip(losses, accs))]


# Hand-computed (sample std, ddof=1):
#   A (2, 0.001, True, 3):  final 0.4, 0.5, 0.6 -> 0.5000 ± 0.1000, n=3; losses 2.0, 2.2, 2.4
#   C (1, 1e-05, False, 3): final 0.45 (best 0.47)   -> 0.4500, n=1 (one seed: spread unknown)
#   B (2, 0.001, False, 3): final 0.30, 0.34         -> 0.3200 ± 0.0283, n=2
#   D (1, 0.0001, False, 5): final 0.10, 0.20        -> 0.1500 ± 0.0707, n=2
RESULTS = {
    (2, 0.001, True, 3, 1): curve([0.01, 0.2, 0.3, 0.4], [4.6, 3.0, 2.5, 2.0]),
    (2, 0.001, True, 3, 2): curve([0.01, 0.2, 0.3, 0.5], [4.6, 3.0, 2.5, 2.2]),
    (2, 0.001, True, 3, 3): curve([0.01, 0.2, 0.3, 0.6], [4.6, 3.0, 2.5, 2.4]),
    (2, 0.001, False, 3, 1): curve([0.01, 0.1, 0.2, 0.30]),
    (2, 0.001, False, 3, 2): curve([0.01, 0.1, 0.2, 0.34]),
    (1, 1e-05, False, 3, 1): curve([0.01, 0.3, 0.47, 0.45]),
    (1, 0.0001, False, 5, 1): curve([0.01, 0.02, 0.03, 0.04, 0.05, 0.10]),
    (1, 0.0001, False, 5, 2): curve([0.01, 0.02, 0.03, 0.04, 0.05, 0.20]),
}

EXPECTED_RANKING = [
    "Top 3 Configurations by Final Accuracy:",
    "1. World Size: 2, LR: 0.001, Swap: True, Rounds: 3, Accuracy: 0.5000 ± 0.1000 (n=3)",
    "2. World Size: 1, LR: 1e-05, Swap: False, Rounds: 3, Accuracy: 0.4500 (n=1)",
    "3. World Size: 2, LR: 0.001, Swap: False, Rounds: 3, Accuracy: 0.3200 ± 0.0283 (n=2)",
]


def write(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_load_round_trips_valid_results(tmp_path, protocol):
    results = dict(RESULTS)
    results[(1, 0.01, False, 1, 7)] = [(0, 5, 0), (1, 4.0, 1)]  # ints allowed for loss/acc
    assert load_pickle(write(tmp_path / "r.pkl", results, protocol)) == results


def test_ranking_lines_exact_order_and_format():
    assert ranking_lines(RESULTS, top=3) == EXPECTED_RANKING
    full = ranking_lines(RESULTS)
    assert full[0] == "Top 5 Configurations by Final Accuracy:"
    assert full[4] == ("4. World Size: 1, LR: 0.0001, Swap: False, Rounds: 5, Accuracy: 0.1500 ± 0.0707 (n=2)")
    assert len(full) == 5  # only 4 configurations exist


def test_summarize_matches_hand_computed_values():
    table = summarize(RESULTS)
    configs = list(
        table[["world_size", "learning_rate", "enable_swapping", "rounds"]].itertuples(index=False, name=None)
    )
    assert configs == [(2, 0.001, True, 3), (1, 1e-05, False, 3), (2, 0.001, False, 3), (1, 0.0001, False, 5)]
    assert table["final_accuracy_mean"].tolist() == pytest.approx([0.5, 0.45, 0.32, 0.15])
    assert table["final_accuracy_std"].tolist() == pytest.approx(
        [0.1, math.nan, 0.02 * 2**0.5, 0.05 * 2**0.5], nan_ok=True
    )
    assert table["n"].tolist() == [3, 1, 2, 2]
    assert table["best_accuracy_mean"].tolist() == pytest.approx([0.5, 0.47, 0.32, 0.15])
    assert table["final_loss_mean"].iloc[0] == pytest.approx(2.2)
    assert table["final_loss_mean"].iloc[1] == pytest.approx(4.6 - 1.5)


def test_make_plots_writes_valid_pngs(tmp_path):
    out = tmp_path / "nested" / "plots"
    paths = make_plots(RESULTS, out)
    assert [p.name for p in paths] == [
        "learning_curves.png",
        "accuracy_vs_lr.png",
        "swap_comparison.png",
        "best_accuracy_vs_rounds.png",
    ]
    for path in paths:
        data = path.read_bytes()
        assert path.parent == out
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, path
    assert plt.get_fignums() == []  # every figure closed


def test_swap_plot_skipped_without_world_size_above_one(tmp_path):
    only_centralised = {k: v for k, v in RESULTS.items() if k[0] == 1}
    names = [p.name for p in make_plots(only_centralised, tmp_path)]
    assert names == ["learning_curves.png", "accuracy_vs_lr.png", "best_accuracy_vs_rounds.png"]
    assert not (tmp_path / "swap_comparison.png").exists()


def test_report_prints_counts_table_and_ranking(tmp_path):
    path = write(tmp_path / "r.pkl", RESULTS)
    lines = []
    report(path, output_dir=tmp_path / "plots", top=3, plots=False, echo=lines.append)
    text = "\n".join(lines)
    assert lines[0] == f"Loaded 8 experiments (4 configurations) from {path}"
    assert "0.5000 ± 0.1000" in text and "0.0707" in text
    start = lines.index(EXPECTED_RANKING[0])  # comparisons and targets follow the ranking now
    (one_seed,) = [row for row in "\n".join(lines[:start]).splitlines() if " 1e-05 " in row]  # summary row
    assert "0.4500" in one_seed and "±" not in one_seed  # one seed: no spread
    assert lines[start : start + 4] == EXPECTED_RANKING
    assert lines[start + 4] == ""
    assert not (tmp_path / "plots").exists()


def test_report_raises_on_bad_input(tmp_path):
    with pytest.raises(ResultsError, match="no such results file"):
        report(tmp_path / "missing.pkl", plots=False, echo=lambda *_: None)


GOOD_KEY = (2, 0.001, True, 3, 1)
GOOD_RUN = curve([0.01, 0.2, 0.3, 0.4])


@pytest.mark.parametrize(
    "content, message",
    [
        ({}, "results dict is empty"),
        ([GOOD_RUN], "holds a list, expected a dict"),
        ({(2, "0.001", True, 3, 1): GOOD_RUN}, "learning_rate is str '0.001', expected float"),
        ({(2, 0.001, 1, 3, 1): GOOD_RUN}, "enable_swapping is int 1, expected bool"),
        ({(True, 0.001, True, 3, 1): GOOD_RUN}, "world_size is bool True, expected int"),
        ({(2, 0.001, True, 3): GOOD_RUN}, "is not a 5-tuple"),
        ({GOOD_KEY: []}, "expected a non-empty list"),
        ({GOOD_KEY: [(1, 4.0, 0.1), (2, 3.0, 0.2)]}, "round 1, expected round 0"),
        (
            {GOOD_KEY: [(0, 4.0, 0.1), (2, 3.0, 0.2), (2, 2.0, 0.3)]},
            "round 2 after round 2, expected rounds strictly increasing",
        ),
        ({GOOD_KEY: [(0, 4.0, 0.1), (1, "3.0", 0.2)]}, r"entry 1 is \(1, '3.0', 0.2\)"),
        ({GOOD_KEY: [(0, 4.0, 0.1, 9)]}, "expected a tuple"),
    ],
)
def test_bad_content_is_refused_with_a_clear_message(tmp_path, content, message):
    path = write(tmp_path / "bad.pkl", content)
    with pytest.raises(ResultsError, match=message) as info:
        load_pickle(path)
    assert str(path) in str(info.value)


def test_first_offending_key_is_named(tmp_path):
    path = write(tmp_path / "r.pkl", {GOOD_KEY: GOOD_RUN, (2, 0.1, "yes", 3, 1): GOOD_RUN})
    with pytest.raises(ResultsError, match=r"key \(2, 0.1, 'yes', 3, 1\)"):
        load_pickle(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ResultsError, match="no such results file"):
        load_pickle(tmp_path / "nope.pkl")
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(ResultsError, match=r"empty \(0 bytes\)"):
        load_pickle(empty)
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(pickle.dumps(RESULTS)[:50])
    with pytest.raises(ResultsError, match="cannot unpickle"):
        load_pickle(corrupt)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_global_is_refused_without_executing_it(tmp_path):
    # Control: the payload really does run under a plain unpickler...
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Evil(control)))
    assert control.exists()
    # ...but load_pickle refuses it before anything is called.
    marker = tmp_path / "pwned"
    path = write(tmp_path / "evil.pkl", {GOOD_KEY: Evil(marker)})
    with pytest.raises(ResultsError, match=r"global (os|posix|nt)\.system") as info:
        load_pickle(path)
    assert not marker.exists()
    assert str(path) in str(info.value)


def test_ordered_dict_global_is_refused(tmp_path):
    path = write(tmp_path / "od.pkl", collections.OrderedDict(RESULTS))
    with pytest.raises(ResultsError, match=r"global collections\.OrderedDict"):
        load_pickle(path)


def test_plots_with_a_single_learning_rate(tmp_path):
    """A grid over one learning rate is a valid grid (seaborn's dodge once divided by zero here)."""
    results = {(1, 0.001, False, 2, seed): [(0, 4.6, 0.01), (1, 4.0, 0.1), (2, 3.5, 0.2)] for seed in (1, 2)}
    paths = make_plots(results, tmp_path)
    assert [p.name for p in paths] == ["learning_curves.png", "accuracy_vs_lr.png", "best_accuracy_vs_rounds.png"]


def test_a_nan_last_round_is_the_final_value_not_an_earlier_round_s():
    from fedshard.results.analysis import per_run

    diverged = {
        (2, 0.001, True, 2, 1): [(0, 4.6, 0.01), (1, 3.0, 0.3), (2, math.nan, 0.01)],
        (2, 0.001, True, 2, 2): [(0, 4.6, 0.01), (1, 3.0, 0.2), (2, math.nan, math.nan)],
    }
    first, second = per_run(diverged).to_dict("records")
    assert math.isnan(first["final_loss"]) and first["final_accuracy"] == 0.01 and first["best_accuracy"] == 0.3
    assert math.isnan(second["final_loss"]) and math.isnan(second["final_accuracy"])
    assert second["best_accuracy"] == 0.2  # the best of the rounds that have an accuracy


def test_one_experiment_is_never_compared_with_itself():
    """A legacy pickle holds world size 1 with swapping on and off: swapping does not apply to one
    trainer, so the two are one experiment and no "swap effect at world size 1" is shown."""
    from fedshard.results.analysis import comparisons

    legacy = {
        (ws, 0.001, swap, 2, seed): curve([0.01, 0.1 * ws + 0.01 * seed + 0.05 * swap, 0.2 * ws + swap * 0.1])
        for ws in (1, 2)
        for swap in (False, True)
        for seed in (1, 2)
    }
    table = comparisons(legacy)
    swap = table[table["setting"] == "enable_swapping"]
    assert swap["world_size"].tolist() == [2, 2]  # final and best accuracy, world size 2 only
    sizes = table[table["setting"] == "world_size"]
    assert sorted(sizes["enable_swapping"].tolist()) == [False, False, True, True]  # ws 1 -> 2 without, with swap


def test_every_setting_has_a_label_and_no_two_share_one():
    from fedshard.core.config import RESULT_SETTINGS
    from fedshard.results.analysis import setting_label

    labels = [setting_label(s) for s in RESULT_SETTINGS]
    assert all(labels) and len(set(labels)) == len(labels)
    assert setting_label("learning_rate") == "LR" and setting_label("a_new_knob") == "A New Knob"


def test_settings_every_run_shares_count_in_telling_experiments_apart():
    """partition=dirichlet is the same for every run (so no column of the tables), yet it is what
    makes two alphas two experiments."""
    import pandas as pd

    from fedshard.results.analysis import comparisons

    frame = pd.DataFrame(
        [
            {
                "world_size": 2,
                "learning_rate": 1e-3,
                "enable_swapping": True,
                "rounds": 1,
                "seed": seed,
                "partition": "dirichlet",
                "dirichlet_alpha": alpha,
                "round": r,
                "test_loss": 4.6 - r,
                "test_accuracy": 0.01 + r * alpha / 10 + seed / 100,
            }
            for alpha in (0.1, 1.0)
            for seed in (1, 2)
            for r in (0, 1)
        ]
    )
    table = comparisons(frame)
    assert table["setting"].tolist() == ["dirichlet_alpha"] * 2
    assert table["mean_difference"].tolist() == pytest.approx([0.09, 0.09])


# --------------------------------------------------------------------------- the harness's 6-tuple key

LAYERWISE = {  # the harness's later key: enable_layerwise_swapping fourth
    (2, 0.0001, False, False, 2, 42): curve([0.01, 0.10, 0.20]),
    (2, 0.0001, False, False, 2, 77): curve([0.01, 0.12, 0.24]),
    (2, 0.0001, False, True, 2, 42): curve([0.01, 0.04, 0.10]),
    (2, 0.0001, False, True, 2, 77): curve([0.01, 0.05, 0.12]),
    (1, 0.0001, False, True, 2, 42): curve([0.01, 0.30, 0.40]),  # as the harness wrote world size 1
}


def test_a_6_tuple_pickle_is_read_with_its_layerwise_setting(tmp_path):
    from fedshard.results.formats import read

    path = write(tmp_path / "harness.pkl", LAYERWISE)
    assert load_pickle(path) == LAYERWISE
    frame = read(path)
    assert frame["enable_layerwise_swapping"].dtype == bool and frame["enable_layerwise_swapping"].sum() == 9
    for bad, message in (
        ({**LAYERWISE, (2, 0.001, True, 2, 1): GOOD_RUN}, "has 5 fields where the first key has 6"),
        ({(2, 0.001, True, "yes", 2, 1): GOOD_RUN}, "enable_layerwise_swapping is str 'yes', expected bool"),
        ({(2, 0.001, True, 2): GOOD_RUN}, "is not a 5-tuple .* nor a 6-tuple"),
    ):
        with pytest.raises(ResultsError, match=message):
            load_pickle(write(tmp_path / "bad.pkl", bad))


def test_best_accuracy_is_over_the_trained_rounds_and_the_start_has_a_column(tmp_path):
    from fedshard.results.analysis import per_run

    # started from a trained model (0.61): the start is its highest accuracy, never its best
    started = {(2, 0.001, True, 2, 1): [(0, 1.5, 0.61), (1, 3.0, 0.30), (2, 2.5, 0.40)]}
    (run,) = per_run(started).to_dict("records")
    assert (run["start_accuracy"], run["best_accuracy"], run["final_accuracy"]) == (0.61, 0.40, 0.40)
    assert run["gain"] == pytest.approx(0.40 - 0.61)
    assert summarize(started)["best_accuracy_mean"].tolist() == [0.40]
    lines = []
    report(write(tmp_path / "started.pkl", started), plots=False, echo=lines.append)
    header, row = lines[3].splitlines()
    assert "Start Acc (round 0)" in header and "Final − Start (mean)" in header and "Best Acc r ≥ 1" in header
    assert row.split()[4:] == ["0.6100", "0.4000", "1", "-0.2100", "0.4000", "2.5000"]  # start, final, n, change, best
    assert any(line.startswith("Note: Runs here start from a trained model") for line in lines)
    assert any("best accuracy its highest over the trained rounds (r ≥ 1" in line for line in lines)
    # from random weights (round 0 at chance) no change is shown
    lines.clear()
    report(write(tmp_path / "random.pkl", RESULTS), plots=False, echo=lines.append)
    assert "Start Acc (round 0)" in lines[3] and "Final − Start" not in "\n".join(lines)


def test_the_learning_curves_of_a_4_x_3_x_2_grid_wrap_and_zoom_into_flat_panels(monkeypatch):
    """The harness's grid: world sizes 1, 2, 4, 8 x three learning rates x swapping. One row of 7
    panels on one y axis was 3107 px wide, with the world-size-8 curves flat at the bottom."""
    from fedshard.results import plots

    top = {1: 0.6, 2: 0.3, 4: 0.25, 8: 0.05}  # world size 8 learns least: flat on a 0..0.6 axis
    grid = {
        (ws, lr, swap, 3, seed): curve(
            [0.01] + [0.01 + top[ws] * r / 3 * (1 + lr * 100) + 0.001 * seed for r in (1, 2, 3)]
        )
        for ws in top
        for lr in (1e-5, 1e-4, 1e-3)
        for swap in ((False,) if ws == 1 else (False, True))
        for seed in (1, 2)
    }
    drawn = []
    monkeypatch.setattr(plots, "_png", lambda figure, title, note: drawn.append((figure, note)) or b"png")
    plots.figures(grid)
    figure, note = drawn[0]
    shown = {ax.get_title().split("\n")[0]: ax for ax in figure.axes if ax.get_visible()}
    assert len(shown) == 7
    rows = sorted({round(ax.get_position().y0, 2) for ax in shown.values()})
    columns = sorted({round(ax.get_position().x0, 2) for ax in shown.values()})
    assert (len(rows), len(columns)) == (4, 2)  # a row per world size, swapping off and on side by side
    own = sorted(name for name, ax in shown.items() if "(own y range)" in ax.get_title())
    assert own == ["world size 8, no swap", "world size 8, swap"]
    assert shown["world size 8, swap"].get_ylim()[1] < 0.2 < shown["world size 2, swap"].get_ylim()[1]
    assert shown["world size 2, swap"].get_ylim() == shown["world size 1, no swap"].get_ylim()
    assert note.startswith("(own y range): zoomed in, as on the shared range")
    plt.close("all")


def test_a_run_name_in_a_panel_title_is_cut_short():
    """init_from=run:<name> is a whole configuration: the panel says which, briefly; report.md in full."""
    from fedshard.results.plots import TITLE_VALUE_CHARS, _extras_label

    row = {"init_from": "run:ws1-lr0.0001-swapfalse-r10-s77-ep1-bs8-train128-test64", "enable_layerwise_swapping": True}
    label = _extras_label(row, ["enable_layerwise_swapping", "init_from"])
    assert label == "layerwise on, init from run:ws1-lr0.0001-swapfa…"
    assert len(label.split("init from ")[1]) == TITLE_VALUE_CHARS
