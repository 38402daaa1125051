"""The model registry: every model's slicing table covers every parameter and buffer, slicing
then assembling gives the state dict back bit for bit, FLOPs and sizes are PyTorch's own
counts, ResNet-34 is torchvision's network key for key and loads its ImageNet weights, and a
model's recipe is its settings' default (runs recorded before models existed read back as
AlexNet). Pure functions and files; the real runs are in test_resnet.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedshard.core import models, sharding, strategies, training
from fedshard.core.config import ConfigError, ExperimentConfig, setting_value
from fedshard.runtime import transport
from fedshard.tracking.runs import RunRecord

MODELS = list(models.REGISTRY)
RESNET34 = models.get("resnet34")


def state_with_buffers(model: models.Model, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full state dict whose batch-norm statistics and step counters are not their initial values."""
    torch.manual_seed(seed)
    state = model.network().state_dict()
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):
            tensor.fill_(2**40 + seed)  # beyond float32's exact integers: must travel as int64
        elif name.endswith(("running_mean", "running_var")):
            tensor.copy_(torch.rand_like(tensor) + 0.5)
    return state


# --- the slicing table ---------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_the_table_names_every_parameter_and_buffer_and_nothing_else(name):
    model = models.get(name)
    state = model.shapes().state_dict()
    rules = sharding.rules(model.table(), state)  # raises on any name the table does not cover
    assert set(rules) == set(state)
    assert set(model.table()) == {k.rpartition(".")[0] for k in state}  # no module named that is not there
    assert sorted(set(model.full_widths().values())) == sorted(model.split_widths)  # what config checks
    for key, rule in rules.items():
        assert (rule == sharding.MAX) == key.endswith("num_batches_tracked"), key


def test_a_tensor_the_table_does_not_name_is_an_error_never_silently_whole():
    state = RESNET34.shapes().state_dict()
    state["layer1.0.extra.weight"] = torch.zeros(3, device="meta")
    with pytest.raises(
        KeyError, match="'layer1.0.extra.weight': the model's slicing table does not name 'layer1.0.extra'"
    ):
        sharding.slice_state(state, 2, RESNET34.table())
    with pytest.raises(KeyError, match="splits 'layer1.0.conv2' along dim 1, which says nothing of a 'running_mean'"):
        sharding.rule(RESNET34.table(), "layer1.0.conv2.running_mean")


def test_resnet34_is_cut_as_the_harness_cut_it():
    rules = sharding.rules(RESNET34.table(), RESNET34.shapes().state_dict())
    block = {k.split(".", 2)[2]: v for k, v in rules.items() if k.startswith("layer2.0.")}
    assert block == {
        "conv1.weight": 0,
        "bn1.weight": 0,
        "bn1.bias": 0,
        "bn1.running_mean": 0,
        "bn1.running_var": 0,
        "bn1.num_batches_tracked": sharding.MAX,
        "conv2.weight": 1,
        "bn2.weight": None,
        "bn2.bias": None,
        "bn2.running_mean": None,
        "bn2.running_var": None,
        "bn2.num_batches_tracked": sharding.MAX,
        "downsample.0.weight": None,
        "downsample.1.weight": None,
        "downsample.1.bias": None,
        "downsample.1.running_mean": None,
        "downsample.1.running_var": None,
        "downsample.1.num_batches_tracked": sharding.MAX,
    }
    assert {k: v for k, v in rules.items() if not k.startswith("layer")} == {
        "conv1.weight": None,
        "bn1.weight": None,
        "bn1.bias": None,
        "bn1.running_mean": None,
        "bn1.running_var": None,
        "bn1.num_batches_tracked": sharding.MAX,
        "fc.weight": None,
        "fc.bias": None,
    }


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_slicing_then_assembling_gives_the_state_dict_back_bit_for_bit(name, n):
    model = models.get(name)
    state = state_with_buffers(model)
    table = model.table()
    slices = sharding.slice_state(state, n, table)
    for k, piece in enumerate(slices):  # each slice is exactly the state of the narrower network
        assert {key: (t.shape, t.dtype) for key, t in piece.items()} == {
            key: (t.shape, t.dtype) for key, t in model.shapes(model.slice_widths(n, k)).state_dict().items()
        }
    back = sharding.assemble(slices, table, weights=list(range(1, n + 1)))
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_batch_norm_statistics_are_concatenated_averaged_or_the_largest_count():
    torch.manual_seed(3)
    parts = [RESNET34.network(RESNET34.slice_widths(2, k)).state_dict() for k in range(2)]
    for k, part in enumerate(parts):
        for key, t in part.items():
            if key.endswith("num_batches_tracked"):
                t.fill_(10 + 5 * k)
            elif key.endswith(("running_mean", "running_var")):
                t.copy_(torch.rand_like(t))
    merged = sharding.assemble(parts, RESNET34.table(), weights=[30, 10])
    np.testing.assert_array_equal(
        merged["layer3.1.bn1.running_var"].numpy(),
        np.concatenate([parts[0]["layer3.1.bn1.running_var"], parts[1]["layer3.1.bn1.running_var"]]),
    )
    np.testing.assert_allclose(
        merged["layer3.1.bn2.running_mean"].numpy(),
        0.75 * parts[0]["layer3.1.bn2.running_mean"].numpy() + 0.25 * parts[1]["layer3.1.bn2.running_mean"].numpy(),
        rtol=1e-6,
        atol=1e-7,
    )
    assert merged["layer3.1.bn2.num_batches_tracked"].item() == 15
    assert merged["layer3.1.bn2.num_batches_tracked"].dtype == torch.int64
    fedavg = strategies.build(ExperimentConfig(model="resnet34", world_size=2, strategy="fedavg"))
    full = [state_with_buffers(RESNET34, seed) for seed in (1, 2)]
    averaged = fedavg.combine(full[0], fedavg.split(full[0], 1), full, [30, 10], 1)
    assert averaged["bn1.num_batches_tracked"].item() == 2**40 + 2  # the larger count, exactly
    np.testing.assert_allclose(
        averaged["bn1.running_var"].numpy(),
        0.75 * full[0]["bn1.running_var"].numpy() + 0.25 * full[1]["bn1.running_var"].numpy(),
        rtol=1e-6,
        atol=1e-7,
    )


def test_layerwise_swapping_exchanges_the_blocks_resnet_splits_by_input():
    lw = strategies.build(
        ExperimentConfig(model="resnet34", world_size=2, enable_swapping=False, enable_layerwise_swapping=True)
    )
    assert sharding.input_split(RESNET34.shapes().state_dict(), RESNET34.table()) == [
        f"layer{s}.{b}.conv2.weight" for s, count in enumerate((3, 4, 6, 3), 1) for b in range(count)
    ]
    state = state_with_buffers(RESNET34)
    sent = lw.split(state, 1)  # round 1: slice s receives input block (s + 1) mod 2
    assert torch.equal(sent[0]["layer4.2.conv2.weight"], state["layer4.2.conv2.weight"][:, 256:])
    assert torch.equal(sent[0]["layer4.2.conv1.weight"], state["layer4.2.conv1.weight"][:256])
    unchanged = lw.combine(state, sent, sent, [5, 5], 1)  # nothing trained: nothing changes, buffers included
    assert all(torch.equal(unchanged[k], state[k]) for k in state)
    with pytest.raises(ConfigError, match="resnet34's split widths 64, 128, 256, 512 do not divide into 3"):
        ExperimentConfig(model="resnet34", world_size=3, enable_layerwise_swapping=True)


# --- sizes and FLOPs ------------------------------------------------------------------------------


def counted_flops(model: models.Model, widths, image_size: int) -> int:
    with torch.device("meta"):
        net = model.network(widths).eval()  # eval: batch norm takes a batch of one image
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, image_size, image_size, device="meta"))
    return counter.get_total_flops()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n, index", [(1, 0), (2, 1), (3, 2)])
def test_forward_flops_and_parameters_are_pytorchs_own_counts(name, n, index):
    model = models.get(name)
    widths = model.slice_widths(n, index)
    for size in sorted({32, 64, model.recipe.image_size}):
        assert model.forward_flops(widths, size) == counted_flops(model, widths, size), size
    assert model.parameter_count(widths) == sum(p.numel() for p in model.network(widths).parameters())


@pytest.mark.parametrize("name", [m for m in MODELS if models.get(m).torchvision])
def test_a_model_with_torchvision_weights_is_torchvisions_network_key_for_key(name):
    import torchvision

    model = models.get(name)
    with torch.device("meta"):
        theirs = torchvision.models.get_model(model.torchvision, num_classes=100).state_dict()
    ours = model.shapes().state_dict()
    assert [(k, t.shape, t.dtype) for k, t in ours.items()] == [(k, t.shape, t.dtype) for k, t in theirs.items()]


def test_resnet34_has_its_size_and_records_it_for_the_full_model_and_a_slice():
    assert RESNET34.parameter_count() == 21_335_972
    assert RESNET34.forward_flops() == 7_326_601_216  # at its own 224 x 224
    sizes = strategies.model_sizes(ExperimentConfig(model="resnet34", world_size=2))
    assert sizes == {
        "model.params_full": 21_335_972,
        "model.params_per_trainer": 10_789_092,
        "model.flops_per_image_full": 7_326_601_216,
        "model.flops_per_image_per_trainer": RESNET34.forward_flops(RESNET34.slice_widths(2, 0)),
    }


def test_a_tensor_parallel_round_of_resnet34_at_world_size_2_moves_what_the_table_predicts():
    """Down (and up) a round moves each trainer's slice: the split tensors once in all, the whole
    ones (stem, bn2, projections, fc) once per trainer. FedAvg moves the whole model per trainer."""
    state = state_with_buffers(RESNET34)
    rules = sharding.rules(RESNET34.table(), state)
    split = sum(transport.word_count(t) for k, t in state.items() if isinstance(rules[k], int))
    whole = sum(transport.word_count(t) for k, t in state.items() if not isinstance(rules[k], int))
    header = 3 * 8  # per trainer: int64 command, round, part
    tp = strategies.build(ExperimentConfig(model="resnet34", world_size=2))
    fedavg = strategies.build(ExperimentConfig(model="resnet34", world_size=2, strategy="fedavg"))
    tp_bytes = sum(transport.nbytes(f) + header for f in transport.flat_payloads(tp.split(state, 1)))
    fedavg_bytes = sum(transport.nbytes(f) + header for f in transport.flat_payloads(fedavg.split(state, 1)))
    assert tp_bytes == 4 * (split + 2 * whole) + 2 * header and fedavg_bytes == 2 * (4 * (split + whole) + header)
    # float32 words: 21.1 M in split tensors, 0.25 M whole (the stem, the bn2s, the projections, fc; the
    # step counters two words each), so a slice round moves 50.6 % of FedAvg's bytes (docs/experiments.md)
    assert (split, whole) == (21_101_312, 251_756)
    assert tp_bytes / fedavg_bytes == pytest.approx(0.5059, abs=1e-4)


# --- torchvision's ImageNet weights ----------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """Torch hub's directory with a stand-in for torchvision's ResNet-34 ImageNet file: a randomly
    initialised torchvision resnet34 (1000 classes), saved under the file name torchvision asks for."""
    import torchvision

    home = tmp_path_factory.mktemp("torch-home")
    torch.manual_seed(11)
    weights = torchvision.models.get_model_weights("resnet34").DEFAULT
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet34().state_dict(), home / "hub" / "checkpoints" / "resnet34-b627a593.pth")
    assert weights.url.endswith("/resnet34-b627a593.pth")
    return home


def load_initial(init_from: str, **settings):
    from fedshard.runtime.initial import weights as load_initial_weights

    return load_initial_weights(ExperimentConfig(model="resnet34", world_size=1, init_from=init_from, **settings))


def test_torchvision_weights_load_key_for_key_with_fc_left_at_its_seeded_init(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    file = torch.load(torch_home / "hub" / "checkpoints" / "resnet34-b627a593.pth")
    loaded, seeded = load_initial("torchvision:DEFAULT"), load_initial("")
    for key, tensor in loaded.items():
        expected = seeded[key] if key.startswith("fc.") else file[key]
        assert torch.equal(tensor, expected), key
    assert loaded["fc.weight"].shape == (100, 512)
    # torchvision's own files predate batch norm's step counters: they stay at the seeded 0
    without = {k: v for k, v in file.items() if not k.endswith("num_batches_tracked")}
    torch.save(without, torch_home / "hub" / "checkpoints" / "resnet34-b627a593.pth")
    try:
        assert torch.equal(
            load_initial("torchvision:IMAGENET1K_V1")["layer1.0.conv1.weight"], file["layer1.0.conv1.weight"]
        )
        # the harness's names: its projections were `shortcut.*`, which it skipped silently; refused here
        renamed = {k.replace("downsample", "shortcut"): v for k, v in file.items()}
        torch.save(renamed, torch_home / "hub" / "checkpoints" / "resnet34-b627a593.pth")
        with pytest.raises(ValueError, match="weights have 'layer2.0.shortcut.0.weight', which fedshard's resnet34"):
            load_initial("torchvision:DEFAULT")
    finally:
        torch.save(file, torch_home / "hub" / "checkpoints" / "resnet34-b627a593.pth")


def test_torchvision_weights_without_internet_are_refused_saying_where_to_put_the_file(tmp_path, monkeypatch):
    """No file in torch hub's directory and no network (simulated: this machine may have one): the
    message names the URL and the exact path to place the file at."""
    import urllib.error

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as refused:
        load_initial("torchvision:DEFAULT")
    message = str(refused.value)
    assert "cannot download https://download.pytorch.org/models/resnet34-b627a593.pth" in message
    assert f"place it at {tmp_path}/hub/checkpoints/resnet34-b627a593.pth" in message
    with pytest.raises(
        ValueError,
        match="torchvision has no resnet34 weights 'BEST'; valid: torchvision:IMAGENET1K_V1, torchvision:DEFAULT",
    ):
        load_initial("torchvision:BEST")
    with pytest.raises(
        ConfigError, match="torchvision has no weights of fedshard's alexnet; models with them: .*resnet34"
    ):
        ExperimentConfig(init_from="torchvision:DEFAULT")


# --- the recipe, and configurations recorded before models existed ----------------------------------


def test_a_models_recipe_is_the_default_of_its_settings_and_recorded_as_the_value():
    alexnet, resnet = ExperimentConfig(), ExperimentConfig(model="resnet34")
    assert {k: alexnet.params()[k] for k in ("model", "optimizer", "image_size", "local_epochs", "batch_size")} == {
        "model": "alexnet",
        "optimizer": "adam",
        "image_size": "32",
        "local_epochs": "3",
        "batch_size": "32",
    }
    assert (resnet.optimizer, resnet.image_size, resnet.local_epochs, resnet.batch_size) == ("sgd", 224, 1, 32)
    # the value a model's own stands for is the same configuration as the value given
    assert ExperimentConfig(model="resnet34", optimizer="sgd", image_size=224, local_epochs=1) == resnet
    assert ExperimentConfig(optimizer="", image_size=0, local_epochs=0, batch_size=0) == alexnet
    assert resnet.run_name() == "ws2-lr0.001-swaptrue-r30-s123-resnet34"
    assert (
        ExperimentConfig(model="resnet34", image_size=32, optimizer="adam").run_name()
        == "ws2-lr0.001-swaptrue-r30-s123-resnet34-adam-img32"
    )
    assert ExperimentConfig(optimizer="sgd", local_epochs=1).run_name() == "ws2-lr0.001-swaptrue-r30-s123-ep1-sgd"
    assert setting_value("init_from", "torchvision:DEFAULT") == "torchvision:DEFAULT"  # a value resnet34 allows
    with pytest.raises(ConfigError, match="local_epochs=0 stands for the model's own value.*alexnet 3, resnet34 1"):
        setting_value("local_epochs", "0")


def test_a_run_recorded_before_models_existed_is_the_same_configuration_as_a_new_alexnet_run():
    new = ExperimentConfig(world_size=2, learning_rate=1e-4, rounds=10, seed=77, precision="fp32")
    old_params = {k: v for k, v in new.params().items() if k not in ("model", "optimizer", "image_size")}
    old = RunRecord("r", "0", "FINISHED", 0, old_params, {}).config()
    assert old == new and old.identity() == new.identity() and old.run_name() == new.run_name()
    assert old.params()["optimizer"] == "adam" and old.params()["image_size"] == "32"


# --- what travels, how images are seen ------------------------------------------------------------------


def test_buffers_travel_exactly_integers_included():
    state = state_with_buffers(RESNET34)
    small = {k: v for k, v in state.items() if k.startswith(("bn1.", "layer1.0.bn1", "fc.bias"))}
    flat = transport.flatten(list(small.values()))
    assert flat.dtype == torch.float32 and flat.numel() == sum(transport.word_count(t) for t in small.values())
    back = transport.unflatten(flat, small)
    for key, tensor in small.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert back["bn1.num_batches_tracked"].item() == 2**40  # no float32 could hold it


def test_images_are_resized_on_the_device_then_cropped_with_padding_an_eighth_of_their_size():
    import torchvision.transforms.functional as TF

    assert [models.get(m).recipe.pad_at(s) for m in ("alexnet", "resnet34") for s in (32, 224)] == [4, 28, 4, 28]
    prep = training.Preprocessing.of("resnet34", 224)
    assert prep.mean == models.IMAGENET_MEAN and prep.pad == 28
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    big = training.resize(images, 224)
    reference = TF.resize(images, [224, 224], antialias=False)  # torchvision's bilinear on tensors
    assert big.shape == (3, 3, 224, 224) and (big.int() - reference.int()).abs().max() <= 1
    assert training.resize(images, 32) is images  # AlexNet's: untouched
    crops = training.augment(big, torch.Generator().manual_seed(1), prep.pad)
    assert crops.shape == (3, 3, 224, 224)
    dy, dx, flip = training.draw_augmentation(3, torch.Generator().manual_seed(1), big.device, prep.pad)
    for k in range(3):
        ref = TF.crop(TF.pad(big[k], [28]), int(dy[k]), int(dx[k]), 224, 224)
        assert torch.equal(crops[k], TF.hflip(ref) if flip[k] else ref)


def test_resnet_at_32_pixels_cannot_train_on_a_batch_of_one_and_says_so(tmp_path, data_dir):
    assert RESNET34.min_batch(32) == 2 and RESNET34.min_batch(64) == 1 and models.get("alexnet").min_batch(32) == 1
    net = RESNET34.network().train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        net(torch.zeros(1, 3, 32, 32))
    net(torch.zeros(1, 3, 64, 64))  # a 2 x 2 map: four values per channel
    from fedshard.runtime import launcher

    cfg = ExperimentConfig(
        model="resnet34", world_size=1, image_size=32, batch_size=8, max_train_samples=33, data_dir=str(data_dir)
    )
    with pytest.raises(
        launcher.CheckFailed,
        match="trainer 0's 33 training images end each epoch on a batch of 1 "
        "at batch_size=8, and resnet34 at image_size=32 trains on batches "
        "of 2 images or more",
    ):
        launcher.check(cfg)


def test_final_models_logged_before_the_registry_still_unpickle(monkeypatch):
    """MLflow pickled them as fedshard.model.AlexNet: --extend and init_from=run:<name> load them."""
    import pickle

    from fedshard.core.models.alexnet import AlexNet

    net = AlexNet(models.get("alexnet").slice_widths(96, 0))
    with monkeypatch.context() as m:
        m.setattr(AlexNet, "__module__", "fedshard.model")  # the name the class had then
        old = pickle.dumps(net)
    assert b"fedshard.model\n" in old or b"fedshard.model\x94" in old
    back = pickle.loads(old)
    assert isinstance(back, AlexNet) and all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())


def test_the_model_is_an_axis_each_with_its_own_recipe_unless_a_setting_is_fixed():
    from fedshard.sweep.grid import expand, make_grid

    one = {"world_sizes": "2", "learning_rates": "1e-3", "swap": "true", "rounds": "1", "seeds": "1"}
    configs = expand(make_grid(one, axes=["model=alexnet,resnet34"]))
    assert [(c.model, c.optimizer, c.image_size, c.local_epochs, c.batch_size) for c in configs] == [
        ("alexnet", "adam", 32, 3, 32),
        ("resnet34", "sgd", 224, 1, 32),
    ]
    fixed = expand(make_grid(one, ["image_size=32"], axes=["model=alexnet,resnet34"]))
    assert [c.run_name() for c in fixed] == ["ws2-lr0.001-swaptrue-r1-s1", "ws2-lr0.001-swaptrue-r1-s1-resnet34-img32"]


def test_fedshard_run_refuses_torchvision_weights_it_cannot_get_exit_2_and_no_run(
    tmp_path, monkeypatch, data_dir, shared_store
):
    import urllib.error

    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from fedshard import cli

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = CliRunner().invoke(
        cli.main,
        [
            "run",
            "--model",
            "resnet34",
            "--world-size",
            "1",
            "--init-from",
            "torchvision:DEFAULT",
            "--data-dir",
            str(data_dir),
            "--experiment-name",
            "torchvision-offline",
        ],
    )
    assert result.exit_code == 2, result.output
    assert f"place it at {tmp_path}/hub/checkpoints/resnet34-b627a593.pth" in result.output
    assert MlflowClient().get_experiment_by_name("torchvision-offline") is None  # nothing was started
