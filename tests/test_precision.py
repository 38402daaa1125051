"""precision: what a run computes in. auto is bf16 where the device computes it natively; bf16
where it does not is refused; runs recorded before precision existed are read as what they
computed, or matched with nothing; and bf16 agrees with fp32 within the CUDA test's tolerances."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from fedshard import cli
from fedshard.core import models, precision, training
from fedshard.core.config import ConfigError, ExperimentConfig
from fedshard.core.models.alexnet import AlexNet
from fedshard.core.synthetic import write_synthetic_cifar100
from fedshard.sweep.grid import SweepError, make_grid
from helpers import experiment_args

slice_widths = models.get("alexnet").slice_widths

NATIVE = precision.cpu_has_native_bf16()
NO_NATIVE_BF16 = (
    "this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): PyTorch emulates it "
    "here, many times slower (benchmarks/RESULTS.md); the reduced-width bf16 test runs instead"
)
FLAGS = "flags\t\t: fpu sse2 avx2 avx512f {}\n"


def test_native_bf16_is_read_from_the_cpu_flags_unless_overridden(monkeypatch):
    monkeypatch.delenv(precision.OVERRIDE, raising=False)
    assert precision.cpu_has_native_bf16(FLAGS.format("avx512_bf16"))
    assert precision.cpu_has_native_bf16(FLAGS.format("amx_bf16 amx_tile"))
    assert not precision.cpu_has_native_bf16(FLAGS.format("avx512bw"))  # AVX-512 alone is not bf16
    assert not precision.cpu_has_native_bf16("model name\t: AMD EPYC with bf16 in its name\n")  # flags, not names
    monkeypatch.setenv(precision.OVERRIDE, "1")
    assert precision.cpu_has_native_bf16(FLAGS.format(""))
    monkeypatch.setenv(precision.OVERRIDE, "0")
    assert not precision.cpu_has_native_bf16(FLAGS.format("avx512_bf16"))


@pytest.mark.parametrize("native, expected", [("1", "bf16"), ("0", "fp32")])
def test_auto_is_bf16_where_the_cpu_computes_it_and_fp32_elsewhere(monkeypatch, native, expected):
    monkeypatch.setenv(precision.OVERRIDE, native)
    assert precision.resolve("auto", "cpu") == expected
    assert precision.resolve("fp32", "cpu") == "fp32" and precision.resolve("auto", "cuda") == "bf16"
    cfg = precision.resolved(ExperimentConfig(device="cpu"))
    assert cfg.precision == expected and cfg.run_name().endswith("-bf16") == (expected == "bf16")


def test_bf16_on_a_cpu_without_it_is_refused_with_what_to_do(tmp_path, data_dir, shared_store, monkeypatch):
    monkeypatch.setenv(precision.OVERRIDE, "0")
    with pytest.raises(precision.PrecisionError, match="precision=bf16: this CPU does not compute bf16 natively"):
        precision.resolve("bf16", "cpu")
    result = CliRunner().invoke(
        cli.main, ["run", *experiment_args(data_dir, precision="bf16", device="cpu"), "--experiment-name", "bf16"]
    )
    assert result.exit_code == 2, result.output
    assert "use precision=fp32 or auto" in result.stderr and "aggregator pid" not in result.output


def test_amp_is_gone_with_a_clear_message(data_dir, shared_store):
    result = CliRunner().invoke(cli.main, ["run", *experiment_args(data_dir), "--amp", "true"])
    assert result.exit_code == 2 and "--amp true: the setting is gone; it is now precision" in result.stderr
    with pytest.raises(ConfigError, match="amp is now precision"):
        ExperimentConfig.from_mapping({"amp": "true"})
    with pytest.raises(SweepError, match="unknown experiment parameter .amp.*amp is now precision"):
        make_grid({}, ["amp=true"])
    with pytest.raises(ConfigError, match="precision='fp16': must be one of auto, bf16, fp32"):
        ExperimentConfig(precision="fp16")


@pytest.mark.parametrize(
    "params, tags, expected",
    [
        ({"precision": "bf16"}, {}, "bf16"),
        ({"precision": "auto"}, {precision.TAG: "fp32"}, "fp32"),  # `mlflow run` logged auto; the tag says
        ({"amp": "true", "device": "cpu"}, {}, "fp32"),  # before precision: a CPU computed fp32 whatever amp said
        ({"amp": "true", "device": "cuda"}, {}, "bf16"),
        ({"amp": "false", "device": "cuda"}, {}, "fp32"),
        ({"amp": "true", "device": "auto"}, {}, "auto"),  # cannot be known: matches no planned (resolved) run
        ({"amp": "true"}, {}, "auto"),
    ],
)
def test_a_recorded_run_is_read_as_what_it_computed(params, tags, expected):
    assert precision.recorded(params, tags) == expected


def test_the_cpu_flags_are_read_once_and_the_override_still_counts(monkeypatch):
    monkeypatch.delenv(precision.OVERRIDE, raising=False)
    precision._cpuinfo.cache_clear()
    native = precision.cpu_has_native_bf16()
    assert precision.resolve("auto", "cpu") == ("bf16" if native else "fp32")
    assert precision._cpuinfo.cache_info().misses == 1  # /proc/cpuinfo read once, not at every resolve
    monkeypatch.setenv(precision.OVERRIDE, "0" if native else "1")  # as the tests and users set it
    assert precision.cpu_has_native_bf16() != native


def test_a_run_that_mlflow_run_logged_with_quoted_params_is_read_unquoted():
    from fedshard.tracking import RunRecord

    legacy = RunRecord("r", "0", "FINISHED", 0, {"world_size": "2", "device": "'cuda'", "amp": "'true'"}, {})
    assert legacy.config().precision == "bf16"
    quoted = RunRecord("r", "0", "FINISHED", 0, {"world_size": "2", "precision": "'fp32'"}, {})
    assert quoted.config().precision == "fp32"


def test_log_probabilities_and_losses_are_fp32_under_cpu_autocast():
    """On a CPU, autocast would leave log_softmax in bf16 (on CUDA it computes it in fp32): the
    model gives fp32 log-probabilities, so losses and their gradients are not bf16-quantised.
    A 1/16-width slice and two images: seconds even where bf16 is emulated."""
    torch.manual_seed(0)
    model, x = AlexNet(slice_widths(16, 0)), torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.fc4(torch.randn(2, model.fc4.in_features)).dtype == torch.bfloat16  # autocast's own
        log_probs = model(x)
    assert log_probs.dtype == torch.float32
    assert model(x).dtype == torch.float32


def one_round(model_widths, bf16: bool, data, test, steps_seed=1):
    torch.manual_seed(0)
    model = AlexNet(model_widths)
    torch.manual_seed(steps_seed)
    result = training.train_local(
        model,
        data,
        learning_rate=1e-4,
        epochs=1,
        batch_size=8,
        generator=torch.Generator().manual_seed(steps_seed),
        bf16=bf16,
    )
    return result.mean_loss, training.evaluate(model, test)[0]


def data_pair(tmp_path, n_train, n_test):
    from fedshard.core import data

    write_synthetic_cifar100(tmp_path, n_train=n_train, n_test=n_test, n_classes=4)
    cpu = torch.device("cpu")
    return (
        training.DeviceData.from_numpy(*data.load_split(tmp_path, "train"), cpu),
        training.DeviceData.from_numpy(*data.load_split(tmp_path, "test"), cpu),
    )


@pytest.mark.slow
def test_a_bf16_round_agrees_with_fp32_at_reduced_width_on_any_cpu(tmp_path):
    """The bf16 path (autocast in training and evaluation) on a 1/16-width slice, which even an
    emulating CPU runs in seconds: the tolerances of the CUDA test."""
    train, test = data_pair(tmp_path, 32, 16)
    (train16, test16), (train32, test32) = (one_round(slice_widths(16, 0), bf16, train, test) for bf16 in (True, False))
    assert train16 == pytest.approx(train32, rel=2e-2) and test16 == pytest.approx(test32, rel=5e-2)
    assert train16 != train32  # it did compute in bf16


@pytest.mark.skipif(not NATIVE, reason=NO_NATIVE_BF16)
@pytest.mark.slow
def test_a_bf16_round_of_the_full_model_agrees_with_fp32(tmp_path):
    """One local round of the full AlexNet in bf16 against fp32 from the same weights, data and
    seeds: the round's training loss within 2 %, the trained model's fp32 test loss within 5 %. Eight
    steps of batch 8 (measured on an AMX CPU: 0.2 % and 1.6 % apart)."""
    train, test = data_pair(tmp_path, 64, 64)
    (train16, test16), (train32, test32) = (one_round(None, bf16, train, test) for bf16 in (True, False))
    assert train16 == pytest.approx(train32, rel=2e-2) and test16 == pytest.approx(test32, rel=5e-2)
