"""Pure train/eval step builders: NNX modules outside, plain pytrees through ``jax.jit``.

A *loss function* is written against the module, as the model code reads best:

    def loss_fn(model, batch, rng) -> (float32[] loss, {name: float32[] metric})

``make_train_step`` turns it into a pure function over states,

    step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics)

that merges the module inside the trace (``nnx.merge``), differentiates w.r.t. the
trainable state only (frozen weights get no gradient and no optimizer state) and applies
the optax update. ``frozen`` is read-only: anything the loss writes into the module
(RNG counters, caches) is dropped, which keeps the step a pure function of its inputs —
the property that makes resume-equals-uninterrupted hold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
TrainStep = Callable[[Any, Any, Any, Batch, jax.Array], tuple[Any, Any, Metrics]]


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn,
                    tx: optax.GradientTransformation) -> TrainStep:
  """Builds the pure train step for one batch kind.

  Args:
    graphdef: from ``partition.split_trainable(model, ...)``.
    loss_fn: ``(model, batch, rng) -> (loss, metrics)``; ``loss`` is the scalar that is
      minimised, ``metrics`` are extra scalars to log.
    tx: the optax transformation (``optim.make_optimizer``).

  Returns:
    ``step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics)``
    with metrics ``{'loss', 'grad_norm', 'param_norm', **loss metrics}``.
  """

  def loss_of(trainable, frozen, batch, rng):
    model = nnx.merge(graphdef, trainable, frozen, copy=True)
    loss, metrics = loss_fn(model, batch, rng)
    return loss, metrics

  def step(trainable, frozen, opt_state, batch, rng):
    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(
        trainable, frozen, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(trainable)}
    return trainable, opt_state, metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef,
                   metrics_fn: Callable[[nnx.Module, Batch], Mapping[str, jax.Array]]
                   ) -> Callable[[Any, Any, Batch], Mapping[str, jax.Array]]:
  """Builds ``eval_step(trainable, frozen, batch) -> metrics`` (pure, jit-able).

  Args:
    graphdef: from ``partition.split_trainable``.
    metrics_fn: ``(model, batch) -> {name: array}``.

  Returns:
    The pure eval step.
  """

  def eval_step(trainable, frozen, batch):
    return metrics_fn(nnx.merge(graphdef, trainable, frozen, copy=True), batch)

  return eval_step


def gradient_check(loss_of: Callable[[Any], jax.Array], params: Any,
                   eps: float = 1e-2) -> tuple[Any, dict[str, float]]:
  """Checks ``jax.grad(loss_of)`` by central differences along the unit gradient.

  Along ``u = g / |g|`` the directional derivative of the loss is ``|g|``, so
  ``(loss(p + eps u) - loss(p - eps u)) / (2 eps)`` must equal the norm. Needs no reference
  values, so a backward pass that is wrong on one backend (while its forward pass is right)
  shows up on that backend alone.

  Args:
    loss_of: ``params -> float32[]`` (jit it first; it is called three times).
    params: the pytree to differentiate.
    eps: step in parameter space.

  Returns:
    (the gradient, {'loss', 'norm' (analytic), 'numeric', 'rel_err', 'resolution'}) where
    ``resolution`` is how far float32 rounding of the two losses alone can move ``numeric``.
  """
  loss, grads = jax.value_and_grad(loss_of)(params)
  norm = float(optax.tree.norm(grads))
  unit = jax.tree.map(lambda g: g / norm, grads)
  plus = float(loss_of(jax.tree.map(lambda p, u: p + eps * u, params, unit)))
  minus = float(loss_of(jax.tree.map(lambda p, u: p - eps * u, params, unit)))
  numeric = (plus - minus) / (2 * eps)
  return grads, {"loss": float(loss), "norm": norm, "numeric": numeric,
                 "rel_err": abs(numeric - norm) / max(norm, 1e-30),
                 "resolution": float(np.spacing(np.float32(abs(float(loss))))) / eps}
