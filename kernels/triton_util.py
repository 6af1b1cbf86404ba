"""What the Triton kernels of kernels/ share: the interpreter switch, autotune configs, block sizes and the dot.

Imported only by the Triton modules (chunk, recurrent, conv, norm, gates, kv_ring), which the dispatcher
(kernels/__init__.py) loads lazily, so CPU-only installs never import triton.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERP = tl.constexpr(INTERPRET)
# Autotuning results kept in Triton's cache directory, so each new process (every `deltamem run`) does not time
# the configs again (it cost about 2 s before the first token at 7B shapes)
CACHE = not INTERPRET


def configs(space: list[dict], warps: list[int], stages: list[int]) -> list[triton.Config]:
    if INTERPRET:  # the interpreter would run every config; one is enough there
        return [triton.Config(space[0], num_warps=warps[0], num_stages=stages[0])]
    return [triton.Config(s, num_warps=w, num_stages=n) for s in space for w in warps for n in stages]


def autotune(space: list[dict], warps: list[int], stages: list[int], key: list[str]):
    """triton.autotune over configs(space, warps, stages), retuned when the `key` arguments change; results kept
    across processes (CACHE)."""
    return triton.autotune(configs=configs(space, warps, stages), key=key, cache_results=CACHE)


def block(n: int) -> int:
    """The power-of-2 block (at least 16) that covers n."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def mm(a, b, PREC: tl.constexpr, acc=None):
    """tl.dot with fp32 accumulate (into acc if given); the interpreter multiplies 16-bit operands wrongly, so it
    gets them as fp32."""
    if _INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    return tl.dot(a, b, acc, input_precision=PREC)
