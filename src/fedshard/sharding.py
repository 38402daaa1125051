"""Pure functions: cut a state dict into slices, glue slices back, and say who trains what.

State dicts here are ordered name -> tensor mappings of AlexNet
(``conv1.weight``, ``conv1.bias``, ...). Nothing is trained or sent here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .model import SPLIT_DIM

StateDict = dict[str, torch.Tensor]


def _layer_and_kind(name: str) -> tuple[str, str]:
    layer, kind = name.rsplit(".", 1)
    if layer not in SPLIT_DIM or kind not in ("weight", "bias"):
        raise KeyError(f"{name!r} is not an AlexNet parameter")
    return layer, kind


def _split_dim(name: str) -> int | None:
    """Dimension along which `name` is cut, or None when it stays whole on every slice."""
    layer, kind = _layer_and_kind(name)
    dim = SPLIT_DIM[layer]
    if kind == "bias":
        return 0 if dim == 0 else None
    return dim


def slice_state(state: Mapping[str, torch.Tensor], n: int) -> list[StateDict]:
    """The n slices of a full state dict, in slice order (views, no copies)."""
    slices: list[StateDict] = [{} for _ in range(n)]
    for name, tensor in state.items():
        dim = _split_dim(name)
        parts = tensor.tensor_split(n, dim) if dim is not None else (tensor,) * n
        for s, part in zip(slices, parts):
            s[name] = part
    return slices


def input_split(names) -> list[str]:
    """The names among `names` cut along their inputs (dim 1): what layerwise swapping exchanges."""
    return [name for name in names if _split_dim(name) == 1]


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean, computed as first + sum(w_i (x_i - first)) so equal inputs come back bit-exact."""
    if weights is None:
        weights = [1.0] * len(tensors)
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must add up to more than zero")
    first = tensors[0]
    out = first.clone()
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t - first, alpha=w / total)
    return out


def assemble(slices: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> StateDict:
    """Inverse of slice_state: concatenate split tensors in slice order; whole-kept biases
    are averaged, weighted by `weights` (the samples each slice was trained on)."""
    out: StateDict = {}
    for name in slices[0]:
        dim = _split_dim(name)
        parts = [s[name] for s in slices]
        out[name] = torch.cat(parts, dim) if dim is not None else weighted_mean(parts, weights)
    return out


def slice_for(trainer: int, round_: int, n: int, swapping: bool, swap_every: int = 2) -> int:
    """Slice that trainer k trains in round r (rounds count from 1): (k + r // swap_every) % n."""
    if not swapping:
        return trainer
    return (trainer + round_ // swap_every) % n


def assignment(round_: int, n: int, swapping: bool, swap_every: int = 2) -> list[int]:
    """Slice index per trainer for one round; always a permutation of range(n)."""
    return [slice_for(k, round_, n, swapping, swap_every) for k in range(n)]
