r"""Runs a module or script with every float32 matmul's operands rounded to TF32, on CPU.

NVIDIA GPUs multiply float32 matrices in TF32 (10-bit mantissa) by default. This rounds both
operands of every ``lax.dot_general`` (einsums, dense layers, and the transposed products of
the backward pass) to the nearest TF32 value and accumulates in float32, so a CPU run shows
whether a result depends on that rounding. Gradients pass straight through the rounding.

  python benchmarks/emulate_tf32.py -m ilm_jax.main --config=configs/phase1.py:it_ii,ml1m,small \
      --workdir=/tmp/tf32 --config.cf_path=W/cf/embeddings.npz
  python benchmarks/emulate_tf32.py benchmarks/phase1_grads.py --cf_path=... --check

``--mantissa=N`` (before the target) keeps N bits instead (7 = bfloat16's).
"""

from __future__ import annotations

import pathlib
import runpy
import sys

import jax
import jax._src.lax.lax as lax_internal  # the transpose rules call dot_general from here
import jax.numpy as jnp


def round_mantissa(x: jax.Array, bits: int) -> jax.Array:
  """float32 ``x`` rounded to ``bits`` mantissa bits (to nearest), with identity gradient."""
  drop = 23 - bits
  u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  u = (u + jnp.uint32(1 << (drop - 1))) & jnp.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
  return x + jax.lax.stop_gradient(jax.lax.bitcast_convert_type(u, jnp.float32) - x)


def install(bits: int = 10) -> None:
  """Makes every later ``dot_general`` on float32 operands round them to ``bits`` bits."""
  original = lax_internal.dot_general

  def rounded(lhs, rhs, *args, **kwargs):
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    if lhs.dtype == jnp.float32:
      lhs = round_mantissa(lhs, bits)
    if rhs.dtype == jnp.float32:
      rhs = round_mantissa(rhs, bits)
    return original(lhs, rhs, *args, **kwargs)

  lax_internal.dot_general = rounded


def main() -> None:
  args = sys.argv[1:]
  bits = 10
  if args and args[0].startswith("--mantissa="):
    bits = int(args.pop(0).split("=", 1)[1])
  if not args or args[0] in ("-h", "--help"):
    print(__doc__)
    sys.exit(0 if args else 2)
  install(bits)
  print(f"emulate_tf32: float32 matmul operands rounded to {bits} mantissa bits", flush=True)
  if args[0] == "-m":
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
  else:
    sys.argv = args
    sys.path.insert(0, str(pathlib.Path(args[0]).resolve().parent))
    runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
  main()
