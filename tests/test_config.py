"""ExperimentConfig: validation messages, canonical params, JSON round trip."""

import re

import pytest

from fedshard.core.config import ConfigError, ExperimentConfig, canonical


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"world_size": 0}, "world_size=0: must be an integer >= 1"),
        ({"world_size": 97}, r"world_size=97: tensor_parallel slicing allows 1\.\.96"),
        ({"learning_rate": 0}, "learning_rate=0.0: must be a finite number > 0"),
        ({"learning_rate": -1e-3}, "learning_rate=-0.001"),
        ({"learning_rate": "fast"}, "learning_rate='fast': must be a number"),
        ({"rounds": 0}, "rounds=0: must be an integer >= 1"),
        ({"rounds": 2.5}, "rounds=2.5: must be an integer"),
        ({"strategy": "ring"}, "strategy='ring': must be one of tensor_parallel, fedavg"),
        ({"partition": "random"}, "partition='random': must be one of iid, contiguous, dirichlet"),
        ({"dirichlet_alpha": 0}, "dirichlet_alpha=0.0"),
        ({"enable_swapping": "maybe"}, "enable_swapping='maybe': must be true or false"),
        ({"batch_size": -1}, r"batch_size=-1: must be an integer >= 1 \(0: the model's own\)"),
        ({"max_train_samples": -1}, "max_train_samples=-1: must be >= 0"),
        ({"seed": -5}, "seed=-5"),
        ({"device": "tpu"}, "device='tpu': must be one of auto, cpu, cuda"),
    ],
)
def test_invalid_values_are_named_with_what_is_valid(changes, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig(**changes)


def test_fedavg_is_not_limited_by_slice_widths():
    assert ExperimentConfig(world_size=200, strategy="fedavg").world_size == 200


def test_strings_are_parsed_and_params_are_canonical():
    a = ExperimentConfig.from_mapping({"learning_rate": "0.00001", "enable_swapping": "True", "rounds": "30"})
    b = ExperimentConfig(learning_rate=1e-5, enable_swapping=True, rounds=30)
    assert a == b
    assert a.params()["learning_rate"] == "1e-05"
    assert a.params()["enable_swapping"] == "true"
    assert canonical(0.001) == "0.001" and canonical(False) == "false"


def test_key_has_the_pickle_types():
    key = ExperimentConfig(world_size=2, learning_rate="1e-3", rounds="50", seed="456").key()
    assert key == (2, 0.001, True, 50, 456)
    assert [type(v) for v in key] == [int, float, bool, int, int]


def test_swapping_is_switched_off_where_it_does_not_apply():
    assert ExperimentConfig(world_size=1, enable_swapping=True).enable_swapping is False
    assert ExperimentConfig(world_size=2, strategy="fedavg", enable_swapping=True).enable_swapping is False
    assert ExperimentConfig(world_size=2, enable_swapping=True).enable_swapping is True


def test_json_round_trip_and_unknown_keys():
    cfg = ExperimentConfig(world_size=3, learning_rate=1e-4, partition="dirichlet", init_from="runs:/x/model")
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown experiment parameter.*wrold_size"):
        ExperimentConfig.from_mapping({"wrold_size": 2})


def test_settings_that_do_not_apply_take_one_value_with_a_note():
    # One trainer trains the whole model whatever the strategy; swap_every means nothing without
    # swapping; dirichlet_alpha nothing for another partition: each is recorded as one value.
    cfg, notes = ExperimentConfig.with_notes(
        {
            "world_size": "1",
            "strategy": "fedavg",
            "enable_swapping": "true",
            "swap_every": "3",
            "partition": "iid",
            "dirichlet_alpha": "0.1",
            "enable_layerwise_swapping": "true",
        }
    )
    assert (cfg.strategy, cfg.enable_swapping, cfg.swap_every, cfg.dirichlet_alpha, cfg.enable_layerwise_swapping) == (
        "tensor_parallel",
        False,
        2,
        0.5,
        False,
    )
    assert cfg == ExperimentConfig(world_size=1, partition="iid")
    assert notes == [
        "one trainer trains the whole model whatever the strategy; running it as centralised training "
        "(strategy=tensor_parallel)",
        "swapping does not apply to world_size=1 with strategy=fedavg; running without it (enable_swapping=false)",
        "layerwise swapping does not apply to world_size=1; running without it (enable_layerwise_swapping=false)",
        "swap_every applies only when slices are swapped; recorded as the default (swap_every=2)",
        "dirichlet_alpha applies only to partition=dirichlet; recorded as the default (dirichlet_alpha=0.5)",
    ]
    kept = ExperimentConfig(world_size=2, swap_every=3, partition="dirichlet", dirichlet_alpha=0.1)
    assert (kept.swap_every, kept.dirichlet_alpha) == (3, 0.1)
    assert ExperimentConfig.with_notes({"world_size": 2, "enable_swapping": "false"})[1] == []


def test_identity_is_every_setting_that_can_change_a_result():
    here = ExperimentConfig(world_size=2, data_dir="/a", eval_batch_size=10, round_timeout=5, device="cpu")
    there = ExperimentConfig(world_size=2, data_dir="/b", deterministic=True)
    assert here != there and here.identity() == there.identity()
    for change in (
        {"strategy": "fedavg"},
        {"batch_size": 16},
        {"partition": "iid"},
        {"seed": 1},
        {"enable_layerwise_swapping": True},
        {"max_train_samples": 100},
        {"local_epochs": 2},
        {"init_from": "w.pt"},
    ):
        assert ExperimentConfig(world_size=2, **change).identity() != here.identity(), change
    assert [name for name, _ in here.identity()][:5] == [
        "world_size",
        "learning_rate",
        "enable_swapping",
        "rounds",
        "seed",
    ]


def test_run_name_is_the_configuration():
    assert ExperimentConfig(world_size=2, learning_rate="0.001", rounds=1).run_name() == "ws2-lr0.001-swaptrue-r1-s123"
    assert ExperimentConfig(world_size=2, strategy="fedavg", rounds=1, batch_size=16).run_name() == (
        "ws2-lr0.001-swapfalse-r1-s123-bs16-fedavg"
    )
    assert ExperimentConfig(partition="dirichlet", dirichlet_alpha=0.1, data_dir="/x").run_name() == (
        "ws2-lr0.001-swaptrue-r30-s123-dirichlet-alpha0.1"
    )


def test_the_defaults_are_the_harness_experiment():
    """batch 32, 3 local epochs, contiguous shards: what `fedshard run` and `mlflow run .` record with no
    settings (the CLI's options and the MLproject take their defaults from here: test_cli.py)."""
    from click.testing import CliRunner

    from fedshard import cli

    params = ExperimentConfig().params()
    assert (params["batch_size"], params["local_epochs"], params["partition"]) == ("32", "3", "contiguous")
    assert params["enable_layerwise_swapping"] == "false"
    shown = CliRunner().invoke(cli.main, ["run", "--help"]).output
    shown = " ".join(shown.split())
    assert re.search(r"--local-epochs INTEGER .*\(0: the model's own, alexnet 3,", shown)
    assert re.search(r"--batch-size INTEGER .*\(0: the model's own, alexnet 32,", shown)
    assert re.search(r"--partition TEXT .*\[default: contiguous\]", shown)
