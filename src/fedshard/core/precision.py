"""What a run computes in: bf16 where the device does it natively, fp32 elsewhere.

`precision` is a setting (auto, bf16, fp32). `auto` becomes bf16 on CUDA and on a CPU whose
flags say it computes bf16 natively (avx512_bf16 or AMX), fp32 elsewhere; `bf16` on a CPU
without it is refused: PyTorch then emulates bf16 over ten times slower than fp32
(benchmarks/RESULTS.md, on an AVX2 machine: a one-round run's training 60.1 s against 4.8 s).
A run records the precision it really computed in (the param `precision`, bf16 or fp32), so a
run in one precision is never skipped, resumed or extended as one in the other.

torch is imported only to ask whether CUDA is there, so the launcher's input check stays fast.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from fedshard.core.errors import FedshardError

# CPU flags (as /proc/cpuinfo names them) of native bf16 arithmetic: AVX-512 BF16 (AMD Zen 4,
# Intel Cooper Lake and later) and AMX (Intel Sapphire Rapids and later).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Overrides the detection ("1": this CPU computes bf16 natively, "0": it does not), for a machine
# whose /proc/cpuinfo does not tell the truth (some containers) or for tests.
OVERRIDE = "FEDSHARD_CPU_BF16"
# The tag of what a run computed in (bf16 or fp32), set on every run: where `mlflow run` had already
# logged the param precision as `auto` (a param cannot change), the only record of it.
TAG = "fedshard.core.precision"


class PrecisionError(FedshardError, ValueError):
    """bf16 asked for where the device does not compute it natively."""

    exit_code = 2


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively: FEDSHARD_CPU_BF16 when set, else its flags."""
    override = os.environ.get(OVERRIDE, "").strip()
    if override in ("0", "1"):
        return override == "1"
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
    flags = {word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()}
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo, read once per process; empty where there is none (not Linux: no claim)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def device_type(device: str) -> str:
    """'cuda' or 'cpu' for a device setting (auto: CUDA when PyTorch sees a GPU)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(requested: str, device: str) -> str:
    """The precision a run computes in on `device` ('cpu', 'cuda' or 'auto'): bf16 or fp32."""
    if requested == "fp32":
        return "fp32"
    native = cpu_has_native_bf16() or device_type(device) == "cuda"  # torch only if the CPU cannot
    if requested == "auto":
        return "bf16" if native else "fp32"
    if not native:
        raise PrecisionError(
            f"precision=bf16: this CPU does not compute bf16 natively (none of {', '.join(NATIVE_BF16_FLAGS)} in "
            f"/proc/cpuinfo), and PyTorch emulates it over ten times slower than fp32; use precision=fp32 or "
            f"auto, or a GPU ({OVERRIDE}=1 overrides the detection)"
        )
    return "bf16"


def resolved(cfg):
    """The configuration with `auto` replaced by what this machine computes in."""
    return cfg if cfg.precision != "auto" else cfg.replace(precision=resolve(cfg.precision, cfg.device))


def recorded(params: dict, tags: dict) -> str:
    """The precision a recorded run computed in, from its params (unquoted: tracking.runs reads
    them) and tags: its param, else the tag the aggregator sets where `mlflow run` had already
    logged `auto`. Runs recorded before precision existed have `amp`: on device=cpu they computed
    in fp32 whatever amp said, on device=cuda in bf16 with amp; on device=auto it cannot be
    known, and they stay `auto`, which matches no planned run."""
    value = params.get("precision", "")
    if value in ("bf16", "fp32"):
        return value
    if tags.get(TAG) in ("bf16", "fp32"):
        return tags[TAG]
    device, amp = params.get("device", "auto"), params.get("amp", "true").lower()
    if "precision" not in params and device == "cpu":
        return "fp32"
    if "precision" not in params and device == "cuda":
        return "bf16" if amp in ("true", "1", "yes", "on") else "fp32"
    return "auto"
