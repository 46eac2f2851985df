"""One process of the multi-host test: the real Phase 1 job, evaluation stubbed out.

    JAX_NUM_CPU_DEVICES=2 JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 \
    JAX_PROCESS_ID=P python tests/_multihost_worker.py SHARED WORKDIR STEPS OUT_NPZ

Starts JAX exactly as ``ilm_jax.main`` does (``distributed.maybe_initialize``; without the
``JAX_*`` variables it is a 1-process run), then runs ``jobs.phase1.run`` on the tiny
config shrunk further (``CONFIG_OVERRIDES``) with prepared data and CF embeddings from
SHARED (made once by the test). ``Phase1Evaluator`` is replaced by a stub: compiling the
four evaluation functions would double the test's time and they are not what is tested.
Process 0 writes the trained Q-Former params (``WORKDIR/phase1``, what Phase 2 loads) to
OUT_NPZ as flat ``path -> array`` entries, plus the checkpointed data-iterator state.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")  # as tests/conftest.py

import numpy as np  # noqa: E402

from ilm_jax import distributed  # noqa: E402

# Small enough to compile fast on a loaded 2-core machine; both batch kinds still run.
CONFIG_OVERRIDES = dict(
    pipeline=dict(text_max_len=8, text_batch=8, pair_batch=8),
    model=dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, proj_dim=16),
    train=dict(log_every=2, checkpoint_every=2),
)


class StubEvaluator:
  """Stands in for ``jobs.phase1.Phase1Evaluator`` (no device work)."""

  pairs = np.zeros((1, 2), np.int32)
  reference: dict[str, float] = {}

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __call__(self, model, step):
    del model, step
    return {}


def config(shared: str, steps: int):
  """configs/phase1.py:tiny with ``CONFIG_OVERRIDES``, SHARED data, ``steps`` updates."""
  import importlib.util  # noqa: PLC0415

  from ilm_jax import resources  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location(
      "phase1_config", resources.REPO_ROOT / "configs/phase1.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny")
  for section, values in CONFIG_OVERRIDES.items():
    c[section].update(values)
  c.data_dir = os.path.join(shared, "data")
  c.cf_path = os.path.join(shared, "cf", "embeddings.npz")
  c.train.total_steps = steps
  c.train.optimizer.warmup_steps = 1
  return c


def prepare_shared(shared: str | os.PathLike, steps: int = 4):
  """Prepared data (SHARED/data) and CF embeddings (SHARED/cf) for ``config(shared)``;
  returns that config. Built once per test module, in the test process."""
  from ilm_jax.data import types  # noqa: PLC0415
  from ilm_jax.jobs import phase1 as phase1_job  # noqa: PLC0415
  from ilm_jax.jobs import prepare  # noqa: PLC0415
  c = config(os.fspath(shared), steps)
  ds = prepare.prepared_dataset(c.data, shared, c.data_dir)
  with c.unlocked():
    c.cf_path = ""  # -> ALS trained here, saved to SHARED/cf/embeddings.npz
  phase1_job.cf_embeddings(c, shared, ds, types.leave_one_out(ds))
  return config(os.fspath(shared), steps)


def override_flags(c) -> list[str]:
  """``--config.x=v`` flags that turn ``configs/phase1.py:tiny`` into ``c`` (for main)."""
  flags = [f"--config.data_dir={c.data_dir}", f"--config.cf_path={c.cf_path}",
           f"--config.train.total_steps={c.train.total_steps}",
           f"--config.train.optimizer.warmup_steps={c.train.optimizer.warmup_steps}"]
  for section, values in CONFIG_OVERRIDES.items():
    flags += [f"--config.{section}.{k}={v}" for k, v in values.items()]
  return flags


def flat_params(workdir: str) -> dict[str, np.ndarray]:
  """The saved Q-Former's params as ``'a/b/c' -> array``."""
  from flax import nnx  # noqa: PLC0415

  from ilm_jax import phase1  # noqa: PLC0415
  state = nnx.to_pure_dict(nnx.state(phase1.load_qformer(workdir), nnx.Param))
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {path_name(path): np.asarray(v) for path, v in leaves}


def path_name(path) -> str:
  """A pytree key path as 'a/b/c'."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def main(shared: str, workdir: str, steps: int, out: str) -> None:
  from absl import logging  # noqa: PLC0415
  logging.set_verbosity(logging.INFO)  # as under absl.app (main): start-up lines in the log
  distributed.maybe_initialize()
  from ilm_jax.jobs import phase1 as phase1_job  # noqa: PLC0415
  phase1_job.Phase1Evaluator = StubEvaluator
  records = phase1_job.run(config(shared, steps), workdir)
  arrays = flat_params(workdir)  # every process: orbax's restore syncs them all
  if jax.process_index() != 0:
    return
  ckpt = os.path.join(workdir, "checkpoints", str(steps))
  data_state = sorted(p for p in os.listdir(ckpt) if p.startswith("data_"))
  arrays["__records__"] = np.asarray(json.dumps(records))
  arrays["__data_items__"] = np.asarray(json.dumps(data_state))
  arrays["__devices__"] = np.asarray([jax.device_count(), jax.process_count()])
  np.savez(out, **arrays)
  print(f"worker: {jax.process_count()} processes x {jax.local_device_count()} devices, "
        f"{len(arrays) - 3} params -> {out}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
