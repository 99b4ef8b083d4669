"""Is half precision worth it on this CPU? Measured, not guessed from CPU flags.

bfloat16 halves memory and, on CPUs with bfloat16 matrix units (AVX-512 BF16, AMX), runs editguard's
steps ~2x faster than float32. Elsewhere PyTorch falls back to slow code: on a 2-core AMD EPYC with AVX2
only, a bfloat16 matmul of the model's shapes ran 50x slower than float32, turning an hour's job into
two days. A short matmul probe tells which case this machine is.
"""

from __future__ import annotations

import functools
import time
import warnings

import torch

from .errors import EditguardWarning

HALF = (torch.bfloat16, torch.float16)
SLOWDOWN_WARNED = 2.0  # slower than float32 by more than this: warn
SPEEDUP_HINTED = 0.6  # bfloat16 at most this share of float32's time: suggest it for long jobs


@functools.cache
def half_precision_slowdown(dtype: torch.dtype) -> float:
    """Time of a [64, 512] x [512, 512] matmul in `dtype` over the same in float32 on this CPU (best of
    three runs each, after a warm-up). Above 1 means `dtype` is slower."""
    def best(dt: torch.dtype) -> float:
        g = torch.Generator().manual_seed(0)  # its own generator: a user's seeded global stream is left alone
        a, b = torch.randn(64, 512, generator=g).to(dt), torch.randn(512, 512, generator=g).to(dt)
        a @ b  # warm-up: first-call dispatch and allocation
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(dtype) / max(best(torch.float32), 1e-9)


def warn_if_slow(model: torch.nn.Module) -> None:
    """Warn (EditguardWarning) when a model held on the CPU in half precision will run much slower
    than it would in float32."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype not in HALF:
        return
    slowdown = half_precision_slowdown(param.dtype)
    if slowdown > SLOWDOWN_WARNED:
        name = str(param.dtype).removeprefix("torch.")
        warnings.warn(EditguardWarning(
            f"{name} matrix products run {slowdown:.0f}x slower than float32 on this CPU (no native {name} "
            f"support); --dtype float32 will be faster"), stacklevel=2)


def bfloat16_hint() -> str | None:
    """A one-line suggestion for a long float32 job (mask training) when this CPU multiplies bfloat16
    clearly faster than float32; None elsewhere."""
    ratio = half_precision_slowdown(torch.bfloat16)
    if ratio > SPEEDUP_HINTED:
        return None
    return (f"bfloat16 matrix products run {1 / ratio:.1f}x faster than float32 on this CPU: --dtype bfloat16 "
            f"trains faster (the frozen layers in bfloat16; Θ, the mask and the edits stay float32)")
