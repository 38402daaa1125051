"""init_from=torchvision:<weights>: torchvision's ImageNet weights of the same network, key for key.

Through torchvision's own weights API (`get_model_weights(...)[name].get_state_dict()`), which
reads the file from torch hub's checkpoints directory and downloads it there when it is missing.
Every key of the file must be a tensor of the same shape in fedshard's network and every one of
the network's must be in the file, or the start is refused naming the key (the harness's loader
skipped its `shortcut.*` layers without a word). Left as the seed made them: the model's head
(ImageNet's 1000 classes are not CIFAR-100's 100) and, where the file predates them (torchvision's
ResNet files do), the batch norms' num_batches_tracked counters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from fedshard.core.models import TORCHVISION_PREFIX, Model

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum


def weights_entry(model: Model, uri: str) -> WeightsEnum:
    """The torchvision weights enum member init_from names; ValueError naming what is valid."""
    from torchvision.models import get_model_weights

    name = uri[len(TORCHVISION_PREFIX) :]
    choices = get_model_weights(model.torchvision)
    if name not in choices.__members__:
        raise ValueError(
            f"init_from={uri!r}: torchvision has no {model.torchvision} weights {name!r}; valid: "
            f"{', '.join(TORCHVISION_PREFIX + n for n in choices.__members__)}"
        )
    return choices[name]


def hub_file(url: str) -> Path:
    """Where torch hub keeps (and looks for) the file of `url`: $TORCH_HOME/hub/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def torchvision_state(model: Model, uri: str, seeded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`seeded` (the model's seeded initial state dict) with every tensor torchvision's weights have
    put in their place; raises ValueError naming a key that does not fit, FileNotFoundError where the
    file is neither on disk nor downloadable."""
    entry = weights_entry(model, uri)
    try:
        theirs = entry.get_state_dict(progress=False)
    except OSError as exc:  # URLError (no network) is an OSError
        raise FileNotFoundError(
            f"init_from={uri!r}: cannot download {entry.url} ({exc}); on a machine without "
            f"internet, download it elsewhere and place it at {hub_file(entry.url)} (torch "
            f"hub's checkpoints directory: $TORCH_HOME/hub/checkpoints)"
        ) from exc
    except Exception as exc:  # a torn or foreign file where torch hub looks
        raise ValueError(f"init_from={uri!r}: {hub_file(entry.url)} is not a state dict ({exc})") from exc
    head = f"{model.head}."
    state = dict(seeded)
    for key, tensor in theirs.items():
        if key.startswith(head):
            continue
        if key not in seeded:
            raise ValueError(
                f"init_from={uri!r}: torchvision's {model.torchvision} weights have {key!r}, which "
                f"fedshard's {model.name} has not"
            )
        if tuple(tensor.shape) != tuple(seeded[key].shape):
            raise ValueError(
                f"init_from={uri!r}: {key!r} is {tuple(tensor.shape)} in torchvision's weights, "
                f"{tuple(seeded[key].shape)} in fedshard's {model.name}"
            )
        state[key] = tensor.to(seeded[key].dtype)
    missing = [
        k for k in seeded if k not in theirs and not k.startswith(head) and not k.endswith(".num_batches_tracked")
    ]
    if missing:
        raise ValueError(
            f"init_from={uri!r}: torchvision's {model.torchvision} weights lack {missing[0]!r}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    return state
