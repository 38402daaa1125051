"""Pure functions: cut a state dict into slices, glue slices back, and say who trains what.

State dicts here are ordered name -> tensor mappings of a model's parameters and buffers
(``conv1.weight``, ``layer1.0.bn1.running_mean``, ...). How each is cut follows from the
model's slicing table (models.Model.table: module -> split dimension or whole), by its kind:

| module split     | weight | bias  | running_mean, running_var | num_batches_tracked |
|------------------|--------|-------|---------------------------|---------------------|
| outputs (dim 0)  | dim 0  | dim 0 | dim 0                     | the maximum         |
| inputs (dim 1)   | dim 1  | whole | (none)                    | (none)              |
| whole (None)     | whole  | whole | whole                     | the maximum         |

Split tensors are concatenated in slice order on assembly, whole ones averaged (weighted by the
samples each slice trained on), batch-norm step counters take their largest value. A name the
table does not cover is an error, never silently whole. Nothing is trained or sent here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]
Table = Mapping[str, "int | None"]
MAX = "max"  # how num_batches_tracked is assembled: it counts steps, it is no weight to average
_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def rule(table: Table, name: str) -> int | None | str:
    """How tensor `name` is cut: the dimension it is split along, None (whole, averaged) or MAX."""
    module, _, kind = name.rpartition(".")
    if module not in table:
        raise KeyError(f"{name!r}: the model's slicing table does not name {module or name!r}")
    if kind == "num_batches_tracked":
        return MAX
    dim = table[module]
    if dim == 1 and kind in ("weight", "bias"):
        return 1 if kind == "weight" else None  # each slice computes all outputs: the bias is added once, whole
    if dim in (0, None) and kind in _PER_CHANNEL:
        return dim
    raise KeyError(f"{name!r}: the slicing table splits {module!r} along dim {dim}, which says nothing of a {kind!r}")


def rules(table: Table, names: Iterable[str]) -> dict[str, int | None | str]:
    """rule() of each name: the slicing table spelt out for every tensor of a state dict."""
    return {name: rule(table, name) for name in names}


def slice_state(state: Mapping[str, torch.Tensor], n: int, table: Table) -> list[StateDict]:
    """The n slices of a full state dict, in slice order (views, no copies)."""
    slices: list[StateDict] = [{} for _ in range(n)]
    for name, tensor in state.items():
        dim = rule(table, name)
        parts = tensor.tensor_split(n, dim) if isinstance(dim, int) else (tensor,) * n
        for s, part in zip(slices, parts):
            s[name] = part
    return slices


def input_split(names: Iterable[str], table: Table) -> list[str]:
    """The names among `names` cut along their inputs (dim 1): what layerwise swapping exchanges."""
    return [name for name in names if rule(table, name) == 1]


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


def combine(
    parts: Sequence[torch.Tensor], how: int | None | str, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """One tensor from its slices' parts, as rule() says: concatenated, averaged or the maximum."""
    if how == MAX:
        return torch.stack(list(parts)).amax(0)
    if how is None:
        return weighted_mean(parts, weights)
    if isinstance(how, str):  # no rule but MAX is a name
        raise ValueError(f"unknown combine rule {how!r}")
    return torch.cat(list(parts), how)


def assemble(
    slices: Sequence[Mapping[str, torch.Tensor]], table: Table, weights: Sequence[float] | None = None
) -> StateDict:
    """Inverse of slice_state: split tensors concatenated in slice order, whole ones averaged
    (weighted by `weights`, the samples each slice was trained on), step counters their maximum."""
    return {name: combine([s[name] for s in slices], rule(table, name), weights) for name in slices[0]}


def slice_for(trainer: int, round_: int, n: int, swapping: bool, swap_every: int = 2) -> int:
    """Slice that trainer k trains in round r (rounds count from 1): (k + r // swap_every) % n."""
    if not swapping:
        return trainer
    return (trainer + round_ // swap_every) % n


def assignment(round_: int, n: int, swapping: bool, swap_every: int = 2) -> list[int]:
    """Slice index per trainer for one round; always a permutation of range(n)."""
    return [slice_for(k, round_, n, swapping, swap_every) for k in range(n)]
