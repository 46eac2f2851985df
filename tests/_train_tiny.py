"""A tiny model, losses and Grain data for loop tests; also a script for signal tests.

    python tests/_train_tiny.py WORKDIR TOTAL_STEPS CHECKPOINT_EVERY [PAUSE_AT]

runs ``train.train`` on the tiny setup and prints ``STEP n`` after every step; with
PAUSE_AT it sleeps after that step (a window for the test to SIGKILL it).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  jax.config.update("jax_default_matmul_precision", "float32")

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ilm_jax import optim, partition, train

VOCAB, DIN, DH, DOUT, BATCH = 4096, 8, 16, 4, 8
FROZEN = ("^table/",)


class TinyModel(nnx.Module):
  """An embedding 'table' (frozen in tests, like the CF tables) + a 2-layer MLP."""

  def __init__(self, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.table = nnx.Embed(VOCAB, DIN, rngs=rngs,
                           embedding_init=partition.with_logical(init, ("vocab", "embed")))
    self.l1 = nnx.Linear(DIN, DH, rngs=rngs,
                         kernel_init=partition.with_logical(init, ("embed", "mlp")))
    self.norm = nnx.LayerNorm(DH, rngs=rngs)
    self.l2 = nnx.Linear(DH, DOUT, rngs=rngs,
                         kernel_init=partition.with_logical(init, ("mlp", "embed")))

  def __call__(self, ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    h = self.norm(self.l1(self.table(ids)))
    if rng is not None:  # dropout-like noise: resume must reproduce the per-step rng
      h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9
    return self.l2(jax.nn.gelu(h))


def model_fn() -> TinyModel:
  return TinyModel(nnx.Rngs(0))


def regression_loss(model, batch, rng):
  """float32[B, DOUT] prediction vs target; metrics carry a batch fingerprint."""
  pred = model(batch["ids"], rng)
  loss = jnp.mean((pred - batch["y"]) ** 2)
  return loss, {"batch_sum": jnp.sum(batch["ids"]).astype(jnp.float32)}


def cosine_loss(model, batch, rng):
  pred = model(batch["ids"], rng)
  cos = jnp.sum(pred * batch["y"], -1) / (
      jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(batch["y"], axis=-1) + 1e-6)
  return 1.0 - jnp.mean(cos), {"batch_sum": jnp.sum(batch["ids"]).astype(jnp.float32)}


LOSSES = {"a": regression_loss, "b": cosine_loss}


def _example(i: int, seed: int, nan_at: int | None = None) -> dict[str, np.ndarray]:
  r = np.random.default_rng(seed * 100_003 + i)
  y = r.normal(size=(DOUT,)).astype(np.float32)
  if nan_at is not None and i == nan_at:
    y[:] = np.nan
  return {"ids": np.int32(r.integers(VOCAB)), "y": y}


def make_iter(seed: int, nan_at: int | None = None, kind: str | None = None):
  """An infinite, shuffled, batched Grain iterator (checkpointable)."""
  ds = (grain.MapDataset.range(64).shuffle(seed=seed).repeat()
        .map(lambda i: _example(int(i), seed, nan_at)).batch(BATCH))
  if kind is not None:
    ds = ds.map(lambda b: {**b, "kind": kind})
  return iter(ds.to_iter_dataset())


def make_data():
  return {"a": make_iter(1), "b": make_iter(2)}


def config(total_steps: int, checkpoint_every: int = 2, **kw):
  return train.default_config(
      total_steps=total_steps, log_every=1, checkpoint_every=checkpoint_every, frozen=FROZEN,
      optimizer=optim.default_config(lr=1e-2, warmup_steps=2, weight_decay=0.1), **kw)


def mesh():
  return partition.make_mesh(data=2, fsdp=4)


def run(workdir, total_steps, checkpoint_every=2, on_step=None, eval_every=0, **kw):
  return train.train(config(total_steps, checkpoint_every, eval_every=eval_every), workdir,
                     model_fn=model_fn, losses=LOSSES, data=make_data(), mesh=mesh(),
                     on_step=on_step, **kw)


if __name__ == "__main__":
  import time
  workdir, total, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  pause_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1

  def report(step, batch):
    print(f"STEP {step}", flush=True)
    if step == pause_at:
      time.sleep(600)

  result = run(workdir, total, every, on_step=report)
  print(f"DONE {result.step} signal={result.stopped_by_signal}", flush=True)
