"""The fast paths compute what the plain ones do.

Augmentation runs batched on the device, evaluation runs in large batches, and on
CUDA the model may run channels_last; none of that may change what is computed.
Statistical checks use fixed seeds (so they are deterministic) and tolerances of
about 4 standard deviations (so a correct implementation passes for any seed).
No experiments, no subprocesses: the whole file runs in a few seconds on a CPU.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedshard.core import models, training
from fedshard.core.models.alexnet import AlexNet
from fedshard.core.training import MEAN, PAD, SIZE, STD, DeviceData

slice_widths = models.get("alexnet").slice_widths

OFFSETS = 2 * PAD + 1  # crop offsets 0..8 into the 40x40 padded image


def coordinate_image() -> torch.Tensor:
    """(3,32,32) uint8: channel 0 holds row+1, channel 1 column+1, channel 2 is 1.

    Every pixel of the original is non-zero, so after augmentation a zero in
    channel 2 is padding, and channels 0/1 say where an output pixel came from.
    """
    rows = torch.arange(SIZE).view(SIZE, 1).expand(SIZE, SIZE) + 1
    cols = torch.arange(SIZE).view(1, SIZE).expand(SIZE, SIZE) + 1
    return torch.stack([rows, cols, torch.ones(SIZE, SIZE, dtype=torch.long)]).to(torch.uint8)


def recover(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flip) per image of augmented coordinate images (B,3,32,32), checking consistency."""
    inside = out[:, 2] == 1  # (B,32,32)
    i = torch.arange(SIZE).view(1, SIZE, 1)
    j = torch.arange(SIZE).view(1, 1, SIZE)
    # Output pixel (i, j) shows padded pixel (dy + i, c); the original's row r sits at padded row r + PAD.
    dy_map = out[:, 0].long() - 1 + PAD - i
    padded_col = out[:, 1].long() - 1 + PAD
    dys, dxs, flips = [], [], []
    for b in range(out.shape[0]):
        m = inside[b]
        dy_values = dy_map[b][m].unique()
        assert len(dy_values) == 1, f"image {b}: rows do not come from one vertical offset"
        steps = padded_col[b, :, 1:] - padded_col[b, :, :-1]
        step = steps[m[:, 1:] & m[:, :-1]].unique()
        assert len(step) == 1 and abs(step.item()) == 1, f"image {b}: columns are not a (mirrored) crop"
        flipped = step.item() == -1
        # Unflipped, output column j shows padded column dx + j; flipped, dx + (31 - j).
        dx_map = padded_col[b] - torch.where(torch.tensor(flipped), SIZE - 1 - j[0], j[0])
        dx_values = dx_map[m].unique()
        assert len(dx_values) == 1, f"image {b}: columns do not come from one horizontal offset"
        dys.append(dy_values.item())
        dxs.append(dx_values.item())
        flips.append(flipped)
    return torch.tensor(dys), torch.tensor(dxs), torch.tensor(flips)


def chi_square_uniform(values: torch.Tensor, k: int) -> float:
    counts = torch.bincount(values, minlength=k).double()
    expected = len(values) / k
    return float(((counts - expected) ** 2 / expected).sum())


# Chi-square critical value for 8 degrees of freedom at p = 0.001 (tables): a
# uniform sampler exceeds it once in a thousand seeds.
CHI2_8DOF_P001 = 26.12


@pytest.fixture(scope="module")
def augmented():
    n = 4500
    images = coordinate_image().expand(n, 3, SIZE, SIZE).contiguous()
    gen = torch.Generator().manual_seed(2024)
    out = training.augment(images, gen)
    return out, *recover(out)


def test_crop_offsets_are_uniform_over_0_to_8_in_both_axes(augmented):
    _, dy, dx, _ = augmented
    assert dy.min() == 0 and dy.max() == 2 * PAD
    assert dx.min() == 0 and dx.max() == 2 * PAD
    assert chi_square_uniform(dy, OFFSETS) < CHI2_8DOF_P001
    assert chi_square_uniform(dx, OFFSETS) < CHI2_8DOF_P001
    # Independent axes: the 81 joint cells are uniform too (80 dof; p=0.001 critical value 124.8).
    assert chi_square_uniform(dy * OFFSETS + dx, OFFSETS * OFFSETS) < 124.8


def test_flip_rate_is_one_half(augmented):
    _, _, _, flip = augmented
    n = len(flip)
    std = math.sqrt(0.25 / n)  # binomial(n, 1/2) proportion: 0.0075 for n = 4500
    assert abs(flip.double().mean().item() - 0.5) < 4 * std


def test_padding_is_zeros_in_every_channel(augmented):
    white = torch.full((500, 3, SIZE, SIZE), 255, dtype=torch.uint8)
    out = training.augment(white, torch.Generator().manual_seed(1))
    assert set(out.unique().tolist()) == {0, 255}
    assert ((out == 0).all(1) | (out == 255).all(1)).all()  # a pixel is padding in all channels or none

    out, dy, dx, _ = augmented
    padding = out[:, 2] == 0
    # Exactly the pixels outside the original are padding: (32-|dy-4|) x (32-|dx-4|) are inside.
    inside_counts = (SIZE - (dy - PAD).abs()) * (SIZE - (dx - PAD).abs())
    assert torch.equal((~padding).sum((1, 2)), inside_counts)
    assert (out.permute(1, 0, 2, 3)[:, padding] == 0).all()


def test_each_image_of_a_batch_draws_its_own_crop_and_flip(augmented):
    _, dy, dx, flip = augmented
    batch = slice(0, 64)  # one training batch
    draws = set(zip(dy[batch].tolist(), dx[batch].tolist(), flip[batch].tolist()))
    assert len(draws) > 32  # 162 equally likely outcomes: a shared draw would give 1
    # Neighbours within the batch are uncorrelated (|r| < 4 / sqrt(n)).
    for v in (dy.double(), dx.double(), flip.double()):
        r = torch.corrcoef(torch.stack([v[:-1], v[1:]]))[0, 1].item()
        assert abs(r) < 4 / math.sqrt(len(v))
    assert abs(torch.corrcoef(torch.stack([dy.double(), flip.double()]))[0, 1].item()) < 4 / math.sqrt(len(dy))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crop_and_flip_equal_torchvision_functional(seed):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (6, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    dy, dx, flip = training.draw_augmentation(len(images), gen, images.device)
    # Cover both flips whatever the draw.
    flip[0], flip[1] = True, False
    ours = training.apply_augmentation(images, dy, dx, flip)
    for k, img in enumerate(images):
        ref = TF.crop(TF.pad(img, [PAD]), int(dy[k]), int(dx[k]), SIZE, SIZE)
        if flip[k]:
            ref = TF.hflip(ref)
        assert torch.equal(ours[k], ref), f"image {k}: dy={int(dy[k])} dx={int(dx[k])} flip={bool(flip[k])}"


def test_augment_is_draw_then_apply():
    images = torch.randint(0, 256, (16, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    a = training.augment(images, torch.Generator().manual_seed(9))
    draws = training.draw_augmentation(len(images), torch.Generator().manual_seed(9), images.device)
    assert torch.equal(a, training.apply_augmentation(images, *draws))


def test_normalised_constant_colour_is_exact_per_channel():
    colour = (200, 17, 96)
    images = torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1).expand(4, 3, SIZE, SIZE)
    out = training.normalize(images)
    assert out.dtype == torch.float32
    for c in range(3):
        expected = (colour[c] / 255 - MEAN[c]) / STD[c]
        assert out[:, c].mean().item() == pytest.approx(expected, abs=1e-6)
        assert out[:, c].std().item() == pytest.approx(0.0, abs=1e-6)
    # After augmentation, padding normalises to (0 - mean) / std and the rest keeps its colour.
    aug = training.normalize(training.augment(images, torch.Generator().manual_seed(0)))
    for c in range(3):
        allowed = torch.tensor([(colour[c] / 255 - MEAN[c]) / STD[c], -MEAN[c] / STD[c]])
        distance = (aug[:, c].reshape(-1, 1) - allowed).abs().min(1).values
        assert distance.max().item() < 1e-6


def small_data(n: int = 200, seed: int = 0) -> DeviceData:
    gen = torch.Generator().manual_seed(seed)
    return DeviceData(
        torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen),
        torch.randint(0, 100, (n,), generator=gen),
    )


def test_input_batches_reproducible_by_seed_and_cover_the_data_once():
    data = small_data(200)
    # Image k is flat grey k and labelled k, to check the shuffle and that labels stay with their image.
    data.images = torch.arange(200, dtype=torch.uint8).view(200, 1, 1, 1).expand(200, 3, SIZE, SIZE).contiguous()
    data.labels = torch.arange(200)

    def batches(seed):
        return list(training.input_batches(data, 64, torch.Generator().manual_seed(seed)))

    a, b, c = batches(7), batches(7), batches(8)
    assert [len(y) for _, y in a] == [64, 64, 64, 8]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in c]))
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in c]))
    for x, y in a:  # the centre pixel is inside every crop: it shows which image this is
        grey = (x[:, 0, SIZE // 2, SIZE // 2] * STD[0] + MEAN[0]) * 255
        assert torch.equal(grey.round().long(), y)
    seen = torch.cat([y for _, y in a])
    assert torch.equal(seen.sort().values, torch.arange(200))  # a permutation: every image once
    assert not torch.equal(seen, torch.arange(200))  # and actually shuffled


def tiny_model(seed: int = 0) -> nn.Module:
    """A small stand-in with what matters here (convolutions, pooling, dropout, log-softmax
    over 100 classes) that runs in milliseconds on a CPU; AlexNet itself is checked below."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(16 * 4 * 4, 100),
        nn.LogSoftmax(1),
    )


def tiny_alexnet(seed: int = 0) -> AlexNet:
    torch.manual_seed(seed)
    return AlexNet(slice_widths(16, 0))  # the real architecture at 1/16 width


def test_train_local_is_bit_for_bit_reproducible_with_the_same_seeds():
    data = small_data(64)

    def run(seed):
        model = tiny_model()
        torch.manual_seed(seed)  # dropout, as the trainer does
        result = training.train_local(
            model, data, learning_rate=1e-3, epochs=1, batch_size=16, generator=torch.Generator().manual_seed(seed)
        )
        return result.mean_loss, torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    (loss_a, w_a), (loss_b, w_b), (_, w_c) = run(3), run(3), run(4)
    assert loss_a == loss_b and torch.equal(w_a, w_b)
    assert not torch.equal(w_a, w_c)


def plain_evaluate(model, data: DeviceData) -> tuple[float, float]:
    """The textbook loop: a batch-size-1 DataLoader, one image at a time."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for image, label in DataLoader(TensorDataset(data.images, data.labels), batch_size=1):
            out = model(training.normalize(image))
            loss += F.nll_loss(out, label, reduction="sum").item()
            correct += int(out.argmax(1).item() == label.item())
    return loss / len(data), correct / len(data)


@pytest.fixture(scope="module")
def eval_case():
    model = tiny_model(1)
    data = small_data(120, seed=1)
    # Make about half the labels the model's own prediction, so accuracy is neither 0 nor 1
    # and a misaligned label or a miscounted batch shows.
    with torch.no_grad():
        predicted = model.eval()(training.normalize(data.images)).argmax(1)
    data.labels[::2] = predicted[::2]
    model.train()  # evaluate must switch dropout off itself
    return model, data, plain_evaluate(model, data)


@pytest.mark.parametrize("batch_size", [1000, 7])  # one batch; several with a short last one
def test_batched_evaluate_equals_batch_size_1_loop(eval_case, batch_size):
    model, data, (ref_loss, ref_acc) = eval_case
    model.train()
    loss, acc = training.evaluate(model, data, batch_size=batch_size)
    assert 0.4 < ref_acc < 0.9
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert acc == ref_acc


def test_channels_last_computes_the_same_and_hands_back_contiguous_weights(eval_case):
    model, data, _ = eval_case
    params = list(model.parameters())
    assert training.evaluate(model, data, 32, channels_last=True) == pytest.approx(
        training.evaluate(model, data, 32, channels_last=False), rel=1e-5
    )
    assert all(p.is_contiguous() and not p.is_inference() for p in model.parameters())
    assert all(a is b for a, b in zip(params, model.parameters()))  # same Parameter objects

    few = DeviceData(data.images[:48], data.labels[:48])

    def train(channels_last):
        m = tiny_model(2)
        torch.manual_seed(0)
        r = training.train_local(
            m,
            few,
            learning_rate=1e-3,
            epochs=1,
            batch_size=8,
            generator=torch.Generator().manual_seed(0),
            channels_last=channels_last,
        )
        return r.mean_loss, m

    loss_plain, _ = train(False)
    loss_cl, m_cl = train(True)
    assert loss_cl == pytest.approx(loss_plain, rel=1e-4)
    assert all(p.is_contiguous() for p in m_cl.parameters())
    torch.nn.utils.parameters_to_vector(m_cl.parameters())  # what the trainer sends back: needs contiguous

    # Same gradients in both layouts. (Weights after Adam steps are no fair comparison:
    # Adam moves a weight by ~lr whatever its gradient's size, so a last-bit difference in a
    # near-zero gradient can flip the sign of a whole step.)
    def grads(channels_last):
        m = tiny_alexnet(3).train()
        x = training.normalize(data.images[:8])
        with training._memory_format(m, channels_last):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
                assert m.conv2.weight.is_contiguous(memory_format=torch.channels_last)
            torch.manual_seed(0)
            F.nll_loss(m(x), data.labels[:8]).backward()
        return [p.grad.clone() for p in m.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_channels_last_follows_bf16_on_cuda_only():
    # on a CPU channels_last measured slower, with bf16 or without (benchmarks/RESULTS.md)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training._use_channels_last(cuda, bf16=True, channels_last=None)
    assert not training._use_channels_last(cuda, bf16=False, channels_last=None)
    assert not training._use_channels_last(cpu, bf16=True, channels_last=None)
    assert training._use_channels_last(cpu, bf16=False, channels_last=True)


@pytest.fixture
def restore_backends(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


def test_configure_backends_sets_the_flags_for_cuda(restore_backends):
    # Only flags and the environment are touched, so this runs without a GPU.
    training.configure_backends(torch.device("cuda"), deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == training.CUBLAS_WORKSPACE
    training.configure_backends(torch.device("cuda"), deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark


def test_configure_backends_leaves_cpu_alone(restore_backends):
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    training.configure_backends(torch.device("cpu"), deterministic=True)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_loss_matches_nll_loss():
    # The gather form used under deterministic CUDA is F.nll_loss's arithmetic (checked on CPU).
    logp = torch.log_softmax(torch.randn(37, 100, generator=torch.Generator().manual_seed(0)), 1)
    y = torch.randint(0, 100, (37,), generator=torch.Generator().manual_seed(1))
    picked = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(picked.mean(), F.nll_loss(logp, y))
    torch.testing.assert_close(picked.sum(), F.nll_loss(logp, y, reduction="sum"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_deterministic_training_is_bit_for_bit(restore_backends):
    training.configure_backends(torch.device("cuda"), deterministic=True)
    cpu = small_data(128)
    data = DeviceData(cpu.images.cuda(), cpu.labels.cuda())

    def run():
        model = tiny_model().cuda()
        torch.manual_seed(0)
        r = training.train_local(
            model,
            data,
            learning_rate=1e-3,
            epochs=1,
            batch_size=32,
            generator=torch.Generator("cuda").manual_seed(0),
            bf16=True,
        )
        return r.mean_loss, torch.nn.utils.parameters_to_vector(model.parameters())

    (la, wa), (lb, wb) = run(), run()
    assert la == lb and torch.equal(wa, wb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_channels_last_evaluation_is_close_to_fp32(eval_case):
    model, cpu, _ = eval_case
    model = copy.deepcopy(model).cuda()
    data = DeviceData(cpu.images.cuda(), cpu.labels.cuda())
    loss32, acc32 = training.evaluate(model, data, bf16=False, channels_last=False)
    loss16, acc16 = training.evaluate(model, data, bf16=True)
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert abs(acc16 - acc32) <= 2 / len(data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_round_agrees_with_fp32(restore_backends):
    """One local round of the full AlexNet with bf16 autocast + channels_last (what runs on CUDA)
    against the same round in fp32, from the same weights, data and seeds. Stated tolerance: the
    round's mean training loss within 2 %, the trained model's fp32 test loss within 5 %."""
    training.configure_backends(torch.device("cuda"), deterministic=False)
    cpu = small_data(512)
    train = DeviceData(cpu.images[:384].cuda(), cpu.labels[:384].cuda())
    test = DeviceData(cpu.images[384:].cuda(), cpu.labels[384:].cuda())
    torch.manual_seed(0)
    start = AlexNet().cuda().state_dict()

    def one_round(bf16: bool):
        model = AlexNet().cuda()
        model.load_state_dict(start)
        torch.manual_seed(1)
        result = training.train_local(
            model,
            train,
            learning_rate=1e-4,
            epochs=1,
            batch_size=64,
            generator=torch.Generator("cuda").manual_seed(1),
            bf16=bf16,
        )
        return result.mean_loss, training.evaluate(model, test, bf16=False, channels_last=False)[0]

    (train16, test16), (train32, test32) = one_round(True), one_round(False)
    assert train16 == pytest.approx(train32, rel=2e-2)
    assert test16 == pytest.approx(test32, rel=5e-2)
