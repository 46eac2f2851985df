"""The optimizer from a config section: AdamW, linear warm-up + cosine decay, clipping.

Only trainable params ever reach the optimizer (``partition.split_trainable`` decides
what trains), so frozen weights have no optimizer state at all — no ``multi_transform`` /
``set_to_zero`` is needed and none of their memory is spent on Adam moments.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from ilm_jax import config_lib

# Params whose path matches this (or that have fewer than 2 dims: biases, norm scales,
# temperatures) get no weight decay, as in BERT/LAVIS.
NO_DECAY_PATTERN = r"(^|/)(bias|scale|norm[^/]*|ln[^/]*|layer_?norm[^/]*|temp[^/]*)(/|$)"


def default_config(**overrides) -> ml_collections.ConfigDict:
  """The ``config.optimizer`` section.

  Keys:
    lr: peak learning rate (reached after warm-up).
    warmup_steps: linear warm-up from 0 to ``lr``.
    total_steps: the cosine decays from ``lr`` to ``lr * end_lr_ratio`` at this step;
      0 = use the training run's total steps (``train.default_config().total_steps``).
    end_lr_ratio: final learning rate as a fraction of ``lr``.
    weight_decay: decoupled AdamW decay (not applied to biases, norms, temperatures).
    b1, b2, eps: Adam moments.
    clip: global-norm gradient clipping; 0 = off.
  """
  c = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=100, total_steps=0, end_lr_ratio=0.0, weight_decay=0.05,
      b1=0.9, b2=0.999, eps=1e-8, clip=1.0))
  c.update(overrides)
  return c


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int | None = None
                  ) -> optax.Schedule:
  """Linear warm-up to ``cfg.lr`` then cosine decay to ``cfg.lr * cfg.end_lr_ratio``.

  Args:
    cfg: the optimizer section (``default_config``).
    total_steps: used when ``cfg.total_steps`` is 0.

  Returns:
    step -> learning rate.
  """
  total = int(cfg.total_steps or total_steps or 0)
  warmup = int(cfg.warmup_steps)
  if total <= 0:
    raise config_lib.ConfigError("optimizer.total_steps is 0 and no run length was given")
  if warmup >= total:
    raise config_lib.ConfigError(
        f"optimizer.warmup_steps={warmup} must be below the run's {total} steps")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=total,
      end_value=cfg.lr * cfg.end_lr_ratio)


def decay_mask(params: Any) -> Any:
  """True for params that get weight decay: >= 2 dims and not a bias/norm/temperature.

  Args:
    params: the trainable state (any pytree; ``nnx.State`` paths are used for names).

  Returns:
    A pytree of bools with the structure of ``params``.
  """
  no_decay = re.compile(NO_DECAY_PATTERN)

  def one(path, x):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
    return bool(np.ndim(x) >= 2 and not no_decay.search(name))

  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int | None = None
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """AdamW with warm-up + cosine schedule, global-norm clipping and a decay mask.

  Args:
    cfg: the optimizer section (``default_config``).
    total_steps: run length, used when ``cfg.total_steps`` is 0.

  Returns:
    (optax transformation, schedule) — the schedule is returned so steps can log the
    learning rate they used.
  """
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.clip:
    parts.append(optax.clip_by_global_norm(cfg.clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
