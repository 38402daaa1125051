"""The grid (pure): the five named axes and their defaults, any other result setting as an axis,
canonical values, settings that do not apply collapsing, and bad input refused before anything
runs. No processes, no MLflow."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from fedshard import cli
from fedshard.core.config import ExperimentConfig
from fedshard.sweep.grid import SweepError, describe, expand, make_grid, named


def test_default_grid_is_the_54_runs_of_design_section_1():
    configs = expand(make_grid({}))
    assert len(configs) == 54
    ws1 = [c for c in configs if c.world_size == 1]
    ws2 = [c for c in configs if c.world_size == 2]
    assert len(ws1) == 18 and len(ws2) == 36
    assert not any(c.enable_swapping for c in ws1)  # swapping only where world_size > 1
    assert sum(c.enable_swapping for c in ws2) == 18
    assert {c.learning_rate for c in configs} == {1e-5, 1e-4, 1e-3}
    assert {c.rounds for c in configs} == {30, 50} and {c.seed for c in configs} == {123, 456, 789}
    assert len(set(configs)) == 54
    assert configs[0].key() == (1, 1e-05, False, 30, 123)
    assert describe(configs[0]) == "world_size=1, lr=1e-05, swap=False, rounds=30, seed=123"
    # every other parameter is the experiment's default
    assert configs[-1] == ExperimentConfig(world_size=2, learning_rate=1e-3, enable_swapping=True, rounds=50, seed=789)


def test_grid_values_are_canonicalised_and_deduplicated():
    grid = make_grid(
        {
            "world_sizes": "2",
            "learning_rates": "1e-5, 0.00001,1E-5",
            "swap": "true,false,yes",
            "rounds": "3",
            "seeds": "1",
        }
    )
    assert [c.key() for c in expand(grid)] == [(2, 1e-05, True, 3, 1), (2, 1e-05, False, 3, 1)]
    # fedavg trains whole models: swapping never applies, so swap=true collapses too
    fedavg = make_grid({"world_sizes": "2", "learning_rates": "1e-3", "rounds": "3", "seeds": "1"}, ["strategy=fedavg"])
    assert [c.key() for c in expand(fedavg)] == [(2, 1e-3, False, 3, 1)]


def test_fixed_params_and_grid_file(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "world_sizes": [2],
                "learning_rates": "1e-4",
                "swap": [True],
                "rounds": [5, 7],
                "seeds": [1],
                "params": {"data_dir": "/data", "max_train_samples": 5000, "precision": "fp32"},
            }
        )
    )
    # options given on the command line win over the file, -P over the file's params
    grid = make_grid({"rounds": "9"}, ["max_train_samples=100", "batch_size=16"], grid_file)
    (cfg,) = expand(grid)
    assert cfg.key() == (2, 1e-4, True, 9, 1)
    assert (cfg.data_dir, cfg.max_train_samples, cfg.batch_size, cfg.precision) == ("/data", 100, 16, "fp32")


@pytest.mark.parametrize(
    "options, assignments, message",
    [
        ({}, ["foo=1"], "unknown experiment parameter 'foo'; valid: model, enable_layerwise_swapping, local_epochs"),
        ({}, ["data_dir"], "expected KEY=VALUE"),
        ({}, ["rounds=3"], "rounds is a grid axis; give it as --rounds"),
        ({}, ["batch_size=-1"], "batch_size=-1: must be an integer >= 1"),
        ({"learning_rates": "1e-3,fast"}, [], "learning_rate='fast': must be a number"),
        ({"world_sizes": "1,,2"}, [], "empty value"),
        ({"world_sizes": ""}, [], "--world-sizes '': no values given"),  # not the default grid
        ({"seeds": " "}, [], "--seeds ' ': no values given"),
        ({"world_sizes": "0,97"}, [], "world_size=97: tensor_parallel slicing allows 1..96"),
    ],
)
def test_bad_grid_or_param_is_refused_before_anything_runs(options, assignments, message):
    with pytest.raises(SweepError) as err:
        expand(make_grid(options, assignments))
    assert message in str(err.value)


def test_bad_grid_file_is_refused(tmp_path):
    bad = tmp_path / "grid.yaml"
    bad.write_text("world_sizes: [1]\nlearning_rate: [1e-3]\n")
    with pytest.raises(SweepError, match="unknown key.*learning_rate; valid: world_sizes"):
        make_grid({}, [], bad)
    with pytest.raises(SweepError, match="cannot read"):
        make_grid({}, [], tmp_path / "missing.yaml")
    for text, message in (
        ("world_sizes: [1, 2\nseeds: [1]\n", "not valid YAML: line 2, column 6: expected ',' or ']', but got ':'"),
        ("world_sizes: []\n", "world_sizes []: no values given"),
        ("params:\n  data_dri: /x\n", "params: unknown experiment parameter 'data_dri'; valid: "),
        ("params:\n  rounds: 3\n", "params: rounds is a grid axis; give it as rounds: [...]"),
    ):
        bad.write_text(text)
        with pytest.raises(SweepError) as refused:
            make_grid({}, [], bad)
        assert str(refused.value).startswith(f"grid file {bad}: ") and message in str(refused.value)
        assert "-P" not in str(refused.value)


def test_any_result_setting_is_an_axis_and_what_does_not_apply_collapses():
    grid = make_grid(
        {"world_sizes": "1,2", "learning_rates": "1e-3", "swap": "false,true", "rounds": "1", "seeds": "7"},
        axes=["strategy=tensor_parallel,fedavg", "partition=iid,dirichlet"],
    )
    assert list(grid.axes) == [
        "world_size",
        "learning_rate",
        "enable_swapping",
        "rounds",
        "seed",
        "strategy",
        "partition",
    ]
    assert grid.extra_axes == ["strategy", "partition"]
    configs = expand(grid)
    # 2 x 2 x 2 x 2 = 16 combinations; world size 1 is one configuration per partition whatever the
    # strategy and swapping (2), FedAvg at world size 2 one per partition whatever swapping (2), the
    # tensor-parallel world size 2 all four: 8.
    assert len(configs) == 8 == len({c.identity() for c in configs})
    ws1 = [c for c in configs if c.world_size == 1]
    assert {(c.strategy, c.enable_swapping) for c in ws1} == {("tensor_parallel", False)}
    fedavg = [c for c in configs if c.strategy == "fedavg"]
    assert len(fedavg) == 2 and not any(c.enable_swapping for c in fedavg)
    assert describe(fedavg[0], grid.extra_axes) == (
        "world_size=2, lr=0.001, swap=False, rounds=1, seed=7, strategy=fedavg, partition=iid"
    )
    assert named(fedavg[0], ["strategy"]) == "(2, 0.001, False, 1, 7) strategy=fedavg"
    # dirichlet_alpha means something only for the dirichlet partition: no second iid run
    alphas = expand(
        make_grid(
            {"world_sizes": "2", "learning_rates": "1e-3", "swap": "false", "rounds": "1", "seeds": "7"},
            axes=["partition=iid,dirichlet", "dirichlet_alpha=0.1,1"],
        )
    )
    assert sorted((c.partition, c.dirichlet_alpha) for c in alphas) == [
        ("dirichlet", 0.1),
        ("dirichlet", 1.0),
        ("iid", 0.5),
    ]


def test_axes_in_a_grid_file_and_on_the_command_line(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "world_sizes": [2],
                "rounds": [1],
                "seeds": [1],
                "learning_rates": [1e-3],
                "axes": {"strategy": ["tensor_parallel", "fedavg"], "batch_size": "8, 16"},
                "params": {"max_train_samples": 64},
            }
        )
    )
    grid = make_grid({}, [], grid_file)
    assert grid.axes["strategy"] == ["tensor_parallel", "fedavg"] and grid.axes["batch_size"] == ["8", "16"]
    assert len(expand(grid)) == 6  # (tp swap, tp no swap, fedavg) x 2 batch sizes
    # --axis wins over the file's axis of the same name; a named axis may be given by its setting too
    grid = make_grid({}, [], grid_file, axes=["batch_size=32", "seed=1,2"])
    assert grid.axes["batch_size"] == ["32"] and grid.axes["seed"] == ["1", "2"]


@pytest.mark.parametrize(
    "options, axes, assignments, message",
    [
        ({}, ["colour=red,blue"], [], "unknown setting 'colour'; an axis can be any of world_size, learning_rate"),
        ({}, ["data_dir=/a,/b"], [], "unknown setting 'data_dir'"),  # where the data sits is no setting of a result
        ({}, ["strategy=fedavg,"], [], "--axis strategy= 'fedavg,': empty value in the list"),
        ({}, ["strategy="], [], "--axis strategy= '': no values given"),
        ({}, ["strategy"], [], "expected NAME=V1,V2"),
        ({}, ["strategy=gossip,fedavg"], [], "strategy='gossip': must be one of tensor_parallel, fedavg"),
        ({}, ["batch_size=16,-1"], [], "batch_size=-1: must be an integer >= 1"),
        ({}, ["partition=iid", "partition=dirichlet"], [], "partition is given twice"),
        ({"seeds": "1"}, ["seed=2"], [], "seed is given twice: as --seeds and as --axis seed"),
        ({}, ["strategy=fedavg"], ["strategy=fedavg"], "strategy is a grid axis; give it as --axis"),
    ],
)
def test_bad_axes_are_refused_before_anything_runs(options, axes, assignments, message):
    with pytest.raises(SweepError) as err:
        expand(make_grid(options, assignments, axes=axes))
    assert message in str(err.value)


def test_bad_axis_from_the_command_line_exits_2_and_creates_nothing(tmp_path, store):
    for args, message in (
        (["--axis", "colour=red"], "unknown setting 'colour'"),
        (["--axis", "strategy="], "no values given"),
        (["--axis", "partition=random"], "partition='random': must be one of iid, contiguous"),
        (["--world-sizes", ""], "--world-sizes '': no values given"),
        (["--learning-rates", ""], "--learning-rates '': no values given"),
        (["--seeds", ""], "--seeds '': no values given"),
    ):
        result = CliRunner().invoke(cli.main, ["sweep", *args, "--experiment-name", "bad-axis"])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert MlflowClient().get_experiment_by_name("bad-axis") is None


def test_mlproject_passes_empty_grid_values_as_not_given(tmp_path, store):
    """MLproject cannot leave an option out: its sweep passes '' for the default grid, with --empty-is-default."""
    from helpers import REPO

    command = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["sweep"]["command"]
    assert command.split()[:3] == ["fedshard", "sweep", "--empty-is-default"]
    options = ("--world-sizes", "--learning-rates", "--swap", "--rounds", "--seeds")
    empty = [arg for option in options for arg in (option, "")]
    result = CliRunner().invoke(
        cli.main, ["sweep", "--empty-is-default", *empty, "--dry-run", "--experiment-name", "mlproject-defaults"]
    )
    assert result.exit_code == 0, result.output
    assert "Total experiments to run: 54 (0 already finished)" in result.output


def test_dry_run_shows_the_axes_and_the_counts(tmp_path, store):
    result = CliRunner().invoke(
        cli.main, ["sweep", "--dry-run", "--axis", "strategy=tensor_parallel,fedavg", "--experiment-name", "dry-axes"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "Axes: world_sizes=1,2 (2) x learning_rates=1e-5,1e-4,1e-3 (3) x swap=false,true (2) x rounds=30,50 (2) "
        "x seeds=123,456,789 (3) x strategy=tensor_parallel,fedavg (2) = 144 combinations, 72 configurations"
    ) in result.output
    assert "Total experiments to run: 72 (0 already finished)" in result.output
    assert (
        "Would run 72/72: world_size=2, lr=0.001, swap=True, rounds=50, seed=789, strategy=tensor_parallel"
        in result.output
    )


def test_the_baselines_grid_file_is_the_researchers_grid_and_fedavg_at_the_same_settings():
    from pathlib import Path

    configs = expand(make_grid({}, [], Path(__file__).resolve().parents[1] / "grids" / "baselines.yaml"))
    method = [c for c in configs if c.strategy == "tensor_parallel"]
    assert method == expand(make_grid({}))  # the 54 runs of the default grid, in its order
    fedavg = [c for c in configs if c.strategy == "fedavg"]
    assert len(fedavg) == 18 and {c.world_size for c in fedavg} == {2} and not any(c.enable_swapping for c in fedavg)
    assert {c.identity() for c in fedavg} == {
        c.replace(strategy="fedavg").identity() for c in method if c.world_size == 2
    }


def test_the_harness_grid_files_are_the_researchers_two_studies():
    from pathlib import Path

    grids = Path(__file__).resolve().parents[1] / "grids"
    first = expand(make_grid({}, [], grids / "harness.yaml"))
    assert (
        len(first) == 63 and {c.world_size for c in first} == {1, 2, 4, 8} and {c.seed for c in first} == {123, 42, 77}
    )
    assert {(c.rounds, c.batch_size, c.local_epochs, c.partition, c.init_from) for c in first} == {
        (10, 32, 3, "contiguous", "")
    }
    source, *second = expand(make_grid({}, [], grids / "harness-pretrained.yaml"))
    assert source in first and source.key() == (1, 1e-4, False, 10, 77)
    assert [c.replace(init_from="", enable_layerwise_swapping=False) for c in second] == first
    assert {c.init_from for c in second} == {"run:ws1-lr0.0001-swapfalse-r10-s77"}
    assert all(c.enable_layerwise_swapping == (c.world_size > 1) for c in second)


def test_a_value_is_checked_with_the_axes_it_runs_with_not_with_the_defaults_of_the_others():
    # tensor_parallel (the default strategy) allows 1..96 trainers; FedAvg any number
    fedavg = make_grid(
        {"world_sizes": "128", "learning_rates": "1e-3", "rounds": "1", "seeds": "1"}, axes=["strategy=fedavg"]
    )
    assert [(c.world_size, c.strategy) for c in expand(fedavg)] == [(128, "fedavg")]
    both = make_grid({"world_sizes": "2,128"}, axes=["strategy=tensor_parallel,fedavg"])
    with pytest.raises(SweepError) as err:
        expand(both)  # 128 with tensor_parallel in 12 combinations: said once
    assert str(err.value) == (
        "invalid sweep:\n  world_size=128: tensor_parallel slicing allows 1..96 "
        "(alexnet's narrowest split layer has 96 channels to split)"
    )
