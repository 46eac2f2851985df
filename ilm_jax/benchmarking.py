"""Shared benchmark helpers: the machine's matmul ceiling and peak memory.

Benchmarks (``benchmarks/*.py``) report achieved FLOP/s as a fraction of
``measure_matmul_ceiling()`` measured in the same process, so numbers from different
machines (or a loaded machine) stay comparable.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5,
            min_time_s: float = 0.0) -> float:
  """Median wall seconds of ``fn()`` (its outputs are blocked on), after ``warmup`` calls.

  Args:
    fn: zero-argument callable returning jax arrays (or pytrees of them).
    warmup: untimed calls first (compilation).
    repeats: timed calls; the median is returned.
    min_time_s: keep timing until at least this much time was measured in total.

  Returns:
    Median seconds per call.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times: list[float] = []
  while len(times) < repeats or sum(times) < min_time_s:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def measure_matmul_ceiling(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 5,
                           device: jax.Device | None = None) -> dict[str, float]:
  """Achievable matmul throughput: a jitted ``[n, n] @ [n, n]`` on one device.

  This is the practical ceiling that model FLOP/s are compared with (peak vendor numbers
  are rarely reachable on CPU). Runs on ``device`` (default: the first device); on a host
  with several virtual CPU devices they share the same cores, so one device is the
  meaningful ceiling.

  Args:
    n: matrix size (2 * n**3 FLOPs per call).
    dtype: operand dtype (float32 by default; matmul precision follows jax config).
    repeats: timed calls (median).
    device: where to run.

  Returns:
    ``{'gflops': achieved GFLOP/s, 'seconds': median seconds per matmul, 'n': n}``.
  """
  device = device or jax.devices()[0]
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(k1, (n, n), dtype), device)
  b = jax.device_put(jax.random.normal(k2, (n, n), dtype), device)
  f = jax.jit(jnp.dot)
  seconds = time_fn(lambda: f(a, b), warmup=2, repeats=repeats)
  return {"gflops": 2.0 * n**3 / seconds / 1e9, "seconds": seconds, "n": float(n)}


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (bytes; Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  peak = peak if sys.platform == "darwin" else peak * 1024
  # The kernel's high-water mark can trail the current RSS by a few pages.
  return int(max(peak, current_rss_bytes()))


def current_rss_bytes() -> int:
  """Current resident memory of this process (bytes)."""
  import psutil  # noqa: PLC0415
  return int(psutil.Process().memory_info().rss)


def write_json(path: str, result: dict[str, Any]) -> None:
  """Writes a benchmark's result (plus the machine's load and devices) to ``path`` and
  says so; no-op when ``path`` is empty (no ``--out``)."""
  if not path:
    return
  result = {"load_after": os.getloadavg(), "devices": [str(d) for d in jax.devices()],
            **result}
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
