"""The one training loop every phase uses.

    result = train.train(config.train, workdir, model_fn=..., losses={'item_text': fn},
                         data=iterator_or_{kind: iterator}, mesh=partition.make_mesh())

Sections, in order (big_vision style): set-up → model & trainable split → optimizer →
restore → compile → loop (batch → jitted step → metrics → progress → eval → checkpoint →
signals) → final checkpoint & eval.

Batch kinds: Phase 1 alternates item-text and item-item batches, each with its own loss
and jitted step. ``data`` is either one iterator whose batches carry a ``'kind'`` entry
(popped before the step), or ``{kind: iterator}``, drawn round-robin in insertion order
(step ``s`` uses kind ``s % len(data)``; deterministic, so a resumed run draws the same
kind at the same step).

Determinism contract (what makes resume == uninterrupted, bit for bit): the step is a pure
function of (trainable, frozen, opt_state, batch, rng); the per-step rng is
``fold_in(base_rng, step)``; the checkpoint at step ``s`` holds the state after ``s``
updates and the iterator positions after ``s`` batches; frozen weights come from
``model_fn`` both times.

Faults: a non-finite metric raises ``NonFiniteLossError`` naming the step, kind and
metric, before any checkpoint could store the bad state (metrics are checked before every
save). SIGTERM/SIGINT set a flag; at the next step boundary the loop saves a checkpoint
and returns normally (so the job exits 0). A second SIGINT interrupts at once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from ilm_jax import checkpoint as checkpoint_lib
from ilm_jax import optim, partition, steps
from ilm_jax.metrics_writer import MetricsWriter


class NonFiniteLossError(FloatingPointError):
  """A loss or metric became NaN/inf; the message names the step, kind and metric."""


def default_config(**overrides) -> ml_collections.ConfigDict:
  """The ``config.train`` section.

  Keys:
    total_steps: updates to run (counted over all batch kinds).
    log_every: progress line + TensorBoard flush every N steps (metrics are fetched from
      the device then too, which is also when the non-finite check runs).
    checkpoint_every: save every N steps (and always at the end); 0 = only at the end.
    keep_checkpoints: newest checkpoints kept.
    async_checkpoint: orbax background saves.
    eval_every: call the eval hook every N steps (and at the end); 0 = only at the end.
    max_seconds: a wall-clock budget for this process's loop; 0 = none. Checked when
      metrics are logged (every ``log_every`` steps): once it is spent the run ends there
      as if ``total_steps`` were reached (final checkpoint, eval, a normal return), while
      the learning-rate schedule keeps ``total_steps``' shape. For time-boxed leases: set
      ``total_steps`` to the most the run may take.
    seed: base rng seed (params init belongs to ``model_fn``; this one feeds dropout and
      hard-negative sampling).
    frozen: regexes over param paths that do not train (``partition.trainable_filter``).
    jit_init: build the model with a jitted, sharded init (``partition.shard_model``);
      False = build on host then ``device_put`` (use it when ``model_fn`` loads large
      pretrained arrays).
    optimizer: ``optim.default_config()``; its ``total_steps`` 0 = ``total_steps`` here.
  """
  c = ml_collections.ConfigDict(dict(
      total_steps=1000, log_every=50, checkpoint_every=500, keep_checkpoints=3,
      async_checkpoint=False, eval_every=0, max_seconds=0.0, seed=0, frozen=(),
      jit_init=True))
  c.optimizer = optim.default_config()
  c.update(overrides)
  return c


@dataclasses.dataclass
class TrainResult:
  """What ``train`` leaves behind.

  Attributes:
    step: updates applied in total (including those before a restore).
    graphdef, trainable, frozen, opt_state: the final split state.
    stopped_by_signal: True when SIGTERM/SIGINT ended the run early (checkpoint saved).
    stopped_by_time: True when ``max_seconds`` ended the loop before ``total_steps``.
    restored_step: the checkpoint step the run resumed from, or None.
    eval_metrics: the last eval hook result.
  """
  step: int
  graphdef: Any
  trainable: Any
  frozen: Any
  opt_state: Any
  stopped_by_signal: bool = False
  stopped_by_time: bool = False
  restored_step: int | None = None
  eval_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

  def model(self) -> nnx.Module:
    """The trained module (a fresh merge; mutating it does not touch the result)."""
    return nnx.merge(self.graphdef, self.trainable, self.frozen, copy=True)


class _StopFlag:
  """SIGTERM/SIGINT → flag checked at step boundaries (handlers only in the main thread)."""

  def __init__(self):
    self.signal: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    else:
      logging.warning("train() not in the main thread: SIGTERM/SIGINT are not handled")
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: the user means it
    self.signal = signum
    logging.warning("received %s: saving a checkpoint at the next step boundary",
                    signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def _kind_of(batch: dict[str, Any], default: str | None, step: int) -> str:
  """Pops the batch's 'kind' (a str, bytes, or a uniform array of them after batching)."""
  kind = batch.pop("kind", default)
  if kind is None:
    raise ValueError(f"the batch at step {step} has no 'kind' entry and several losses "
                     "exist; add 'kind' to the batches or pass data as {kind: iterator}")
  if isinstance(kind, np.ndarray):
    values = np.unique(kind)
    if values.size != 1:
      raise ValueError(f"a batch mixes kinds {values.tolist()}; batch each kind separately")
    kind = values.item()
  if isinstance(kind, bytes):
    kind = kind.decode()
  return str(kind)


def _optimizer_shardings(abstract_opt_state: Any, param_shardings: Any,
                         replicated: jax.sharding.NamedSharding) -> Any:
  """Each optimizer leaf whose path ends with a param's path (Adam's mu/nu) gets that
  param's sharding; everything else (counts, schedule state) is replicated.

  Propagation through a jitted ``tx.init`` does not guarantee this (XLA may replicate the
  zeros), and FSDP needs the moments sharded like their params.
  """
  by_path = {tuple(p): sh for p, sh in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def one(path, leaf):
    for n in lengths:
      sh = by_path.get(tuple(path[-n:]))
      if sh is not None and len(path) > n and len(sh.spec) <= leaf.ndim:
        return sh
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def _fetch_replicated(x: Any) -> np.ndarray:
  """Host copy of a replicated array, also on multi-host runs (not fully addressable)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_shards[0].data)
  return np.asarray(x)


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          model_fn: Callable[[], nnx.Module],
          losses: Mapping[str, steps.LossFn],
          data: Iterator[dict[str, Any]] | Mapping[str, Iterator[dict[str, Any]]],
          mesh: jax.sharding.Mesh,
          rules: partition.LogicalRules = partition.DEFAULT_RULES,
          eval_fn: Callable[[nnx.Module, int], Mapping[str, Any]] | None = None,
          on_step: Callable[[int, Mapping[str, Any]], None] | None = None) -> TrainResult:
  """Trains ``model_fn()``'s trainable params on ``data``; resumes from ``workdir``.

  Args:
    config: the train section (``default_config``).
    workdir: run directory: ``checkpoints/``, ``metrics.jsonl``, ``tb/``.
    model_fn: zero-argument constructor of the full module, frozen weights loaded (it is
      called again on resume; trainable values are then overwritten from the checkpoint).
    losses: batch kind -> ``loss_fn(model, batch, rng) -> (loss, metrics)``.
    data: an iterator of batches with a ``'kind'`` entry, or ``{kind: iterator}``. Grain
      ``DatasetIterator``s are checkpointed; batches are dicts of host-local numpy arrays
      (this process's rows; see ``partition.shard_batch``).
    mesh: device mesh (``partition.make_mesh``).
    rules: logical axis rules for params.
    eval_fn: ``(model, step) -> {name: value}``, called every ``eval_every`` steps and at
      the end; values are logged as ``eval/<name>``.
    on_step: called after every step with (step, batch) on the host — a test hook.

  Returns:
    TrainResult.

  Raises:
    NonFiniteLossError: a metric became NaN/inf (message names step, kind, metric).
    checkpoint.CheckpointError: a save failed (e.g. disk full) or no stored step is usable.
  """
  # ==== Set-up ==========================================================================
  workdir = os.fspath(workdir)
  total_steps = int(config.total_steps)
  log_every = max(1, int(config.log_every))
  max_seconds = float(config.max_seconds)
  writer = MetricsWriter(workdir)
  iterators = dict(data) if isinstance(data, Mapping) else {"train": data}
  round_robin = list(iterators) if isinstance(data, Mapping) else None
  for name, it in iterators.items():
    if not (hasattr(it, "get_state") and hasattr(it, "set_state")):
      raise TypeError(
          f"data iterator {name!r} ({type(it).__name__}) cannot be checkpointed: resume "
          "would not continue at the same batch. Use a Grain DatasetIterator "
          "(iter(dataset.to_iter_dataset())) or anything with get_state/set_state.")
  unknown = set(round_robin or ()) - set(losses)
  if unknown:
    raise ValueError(f"data kinds {sorted(unknown)} have no loss; losses: {sorted(losses)}")

  # ==== Model: shapes first, then a sharded build; one filter splits trainable/frozen ===
  if config.jit_init:
    model = partition.shard_model(model_fn, mesh, rules)
  else:
    model = partition.place_state(model_fn(), mesh, rules)
  graphdef, trainable, frozen = partition.split_trainable(model, tuple(config.frozen))
  del model
  counts = partition.param_counts(trainable, frozen)
  logging.info("parameters: %s trainable, %s frozen (frozen patterns %s)",
               f"{counts['trainable']:,}", f"{counts['frozen']:,}", list(config.frozen))

  # ==== Optimizer: state for trainable params only ======================================
  tx, schedule = optim.make_optimizer(config.optimizer, total_steps)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  trainable_sh = jax.tree.map(lambda x: x.sharding, trainable)
  abstract_opt = jax.eval_shape(tx.init, trainable)
  opt_sh = _optimizer_shardings(abstract_opt, trainable_sh, replicated)
  base_rng = jax.random.key(int(config.seed))

  # ==== Restore (newest intact checkpoint; iterators repositioned in place) ============
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=int(config.keep_checkpoints),
      async_save=bool(config.async_checkpoint))

  def ckpt_state(step_value, params, opt):
    # step and rng as host numpy: orbax writes those once (process 0) on multi-host runs.
    return {"params": params, "opt_state": opt, "step": np.asarray(step_value, np.int64),
            "rng": np.asarray(jax.random.key_data(base_rng))}

  # The restore target is a skeleton: shapes from eval_shape, shardings from the rules;
  # no optimizer state is allocated before we know whether a checkpoint exists.
  abstract = ckpt_state(
      0, checkpoint_lib.abstract_like(trainable),
      jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                   abstract_opt, opt_sh))
  step = 0
  restored_step = None
  restored = ckpt.restore(abstract, iterators)
  if restored is None:
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
  else:
    restored_step, state = restored
    trainable, opt_state = state["params"], state["opt_state"]
    base_rng = jax.random.wrap_key_data(np.asarray(state["rng"]))
    step = int(state["step"])
    if step != restored_step:
      raise checkpoint_lib.CheckpointError(
          f"checkpoint directory step {restored_step} holds state of step {step}")
    writer.truncate_after(step)
    logging.info("resumed from checkpoint step %d in %s", step, ckpt.directory)

  # ==== Compile: one jitted pure step per batch kind; states donated ===================
  jitted = {
      kind: jax.jit(steps.make_train_step(graphdef, fn, tx),
                    out_shardings=(trainable_sh, opt_sh, replicated),
                    donate_argnums=(0, 2))
      for kind, fn in losses.items()}

  pending: list[tuple[int, str, dict[str, Any]]] = []

  def flush_metrics() -> dict[str, float]:
    """Fetches pending step metrics, checks them, writes them; returns the last record."""
    last: dict[str, float] = {}
    fetched = [(s, kind, jax.tree.map(_fetch_replicated, m)) for s, kind, m in pending]
    pending.clear()
    for s, kind, metrics in fetched:
      for name, value in metrics.items():
        if not np.all(np.isfinite(value)):
          raise NonFiniteLossError(
              f"non-finite {name}={value} at step {s} (batch kind {kind!r}); stopping "
              f"without saving. Last checkpoint: {ckpt.latest_step()}")
      last = {"kind": kind, **{k: float(np.mean(v)) for k, v in metrics.items()},
              "learning_rate": float(schedule(s - 1))}
      writer.write(s, last, prefix=f"train/{kind}/" if len(losses) > 1 else "train/")
    return last

  def save(s: int) -> None:
    flush_metrics()  # never store a state whose metrics were not checked
    if ckpt.save(s, ckpt_state(s, trainable, opt_state), iterators):
      logging.info("saved checkpoint step %d", s)

  eval_metrics: dict[str, Any] = {}

  def run_eval(s: int) -> None:
    nonlocal eval_metrics
    if eval_fn is None:
      return
    flush_metrics()
    t0 = time.perf_counter()
    eval_metrics = dict(eval_fn(nnx.merge(graphdef, trainable, frozen, copy=True), s))
    eval_metrics["eval_seconds"] = time.perf_counter() - t0
    writer.write(s, {f"eval/{k}": v for k, v in eval_metrics.items()})
    logging.info("eval at step %d: %s", s, eval_metrics)

  # ==== Loop ============================================================================
  stopped = out_of_time = False
  t_window, step_window = time.perf_counter(), step
  t_start, step_start = t_window, step
  try:
    with _StopFlag() as stop:
      while step < total_steps:
        # ---- batch ----
        if round_robin is not None:
          kind = round_robin[step % len(round_robin)]
          source = iterators[kind]
        else:
          kind, source = None, iterators["train"]
        try:
          batch = dict(next(source))
        except StopIteration:
          logging.warning("data ran out after %d steps (of %d); stopping", step, total_steps)
          break
        if kind is None and len(losses) == 1:
          kind = next(iter(losses))
        kind = _kind_of(batch, kind, step)
        if kind not in jitted:
          raise ValueError(f"batch kind {kind!r} at step {step} has no loss; "
                           f"losses: {sorted(jitted)}")
        host_batch = batch
        batch = partition.shard_batch(batch, mesh)

        # ---- step ----
        rng = jax.random.fold_in(base_rng, step)
        trainable, opt_state, metrics = jitted[kind](trainable, frozen, opt_state, batch, rng)
        step += 1
        pending.append((step, kind, metrics))
        if on_step is not None:
          on_step(step, host_batch)

        # ---- metrics, progress ----
        if step % log_every == 0 or step == total_steps:
          last = flush_metrics()
          now = time.perf_counter()
          rate = (step - step_window) / max(now - t_window, 1e-9)
          eta = (total_steps - step) / rate if rate > 0 else float("inf")
          writer.write(step, {"steps_per_sec": rate})
          writer.flush()
          logging.info("step %d/%d (%.1f%%) | %.2f steps/s | loss %.4f | ETA %s",
                       step, total_steps, 100.0 * step / total_steps, rate,
                       last.get("loss", float("nan")), _format_eta(eta))
          t_window, step_window = now, step
          if max_seconds and now - t_start >= max_seconds and step < total_steps:
            out_of_time = True
            logging.warning("max_seconds=%g spent at step %d of %d; ending the run here",
                            max_seconds, step, total_steps)

        # ---- eval, checkpoint ----
        if (config.eval_every and step % int(config.eval_every) == 0 and step < total_steps
            and not out_of_time):
          run_eval(step)
        if config.checkpoint_every and step % int(config.checkpoint_every) == 0:
          save(step)

        # ---- signals ----
        if stop.signal is not None:
          save(step)
          stopped = True
          logging.warning("stopped by %s at step %d; checkpoint saved",
                          signal.Signals(stop.signal).name, step)
          break
        if out_of_time:
          break

    # ==== Final checkpoint and eval =======================================================
    save(step)
    if not stopped and step > step_start:
      run_eval(step)
      elapsed = time.perf_counter() - t_start
      logging.info("trained steps %d..%d in %.1fs (%.2f steps/s incl. compile)",
                   step_start, step, elapsed, (step - step_start) / max(elapsed, 1e-9))
  except BaseException:
    # Close without masking the original error (a failing close must not hide it).
    writer.close()
    try:
      ckpt.close()
    except Exception as e:  # noqa: BLE001
      logging.error("closing the checkpointer after an error also failed: %s", e)
    raise
  ckpt.close()
  writer.close()
  return TrainResult(step=step, graphdef=graphdef, trainable=trainable, frozen=frozen,
                     opt_state=opt_state, stopped_by_signal=stopped,
                     stopped_by_time=out_of_time,
                     restored_step=restored_step, eval_metrics=eval_metrics)


__all__: Sequence[str] = ("NonFiniteLossError", "TrainResult", "default_config", "train")
