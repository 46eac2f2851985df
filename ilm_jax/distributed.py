"""Multi-host start-up: ``jax.distributed.initialize()`` when the run spans several processes.

``ilm_jax.main`` calls ``maybe_initialize(config)`` before anything touches a device. What
decides (the first rule that applies):

  1. ``config.distributed`` (only configs that include ``distributed.default_config()``)
     or the environment variable ``ILM_DISTRIBUTED``: ``mode='off'`` never initialises;
     ``mode='on'`` always does (JAX then auto-detects whatever is not given).
  2. Explicit settings: ``config.distributed.{coordinator_address, num_processes,
     process_id}`` (set values win) else the environment variables of ``launch/README.md``
     ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``. All three
     are needed (a partial set is an error naming the missing ones, not a hang).
  3. A scheduler that JAX detects itself with more than one task: SLURM
     (``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS`` > 1) or Open MPI
     (``OMPI_COMM_WORLD_SIZE`` > 1) -> ``initialize()`` with no arguments.
  4. A Cloud TPU VM (JAX's own detection at import: libtpu installed and TPU chips on
     the PCI bus, ``jax._src.cloud_tpu_init.running_in_cloud_tpu_vm``) ->
     ``initialize()`` with no arguments: JAX reads the slice's workers from the TPU
     metadata server (GCE) or ``TPU_WORKER_HOSTNAMES`` (GKE); a one-host slice simply
     becomes a 1-process run.
  5. Otherwise: one process, nothing to do.

Before a multi-process start the CPU cross-process collectives are set to gloo
(``jax_cpu_collectives_implementation``; the default in jax 0.10 too, set explicitly so a
CPU run never falls back to "no collectives"). GPU (NCCL) and TPU (ICI) ignore it.

After start-up, processes other than 0 print nothing to stdout and log warnings only
(``quiet_non_primary``): metrics, results.json and summaries come from process 0 alone;
every process still takes part in orbax saves, which coordinate their own writes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from absl import logging

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_MODE = "ILM_DISTRIBUTED"
MODES = ("auto", "on", "off")


class DistributedConfigError(ValueError):
  """The multi-host settings are incomplete or malformed (message names the setting)."""


def default_config(**overrides: Any) -> ml_collections.ConfigDict:
  """An optional ``config.distributed`` section (a job config may include it).

  Keys:
    mode: 'auto' (rules 2-5 of the module docstring), 'on' or 'off'.
    coordinator_address: 'host:port' of process 0; '' = ``JAX_COORDINATOR_ADDRESS``.
    num_processes: 0 = ``JAX_NUM_PROCESSES``.
    process_id: -1 = ``JAX_PROCESS_ID``.
    initialization_timeout: seconds to wait for every process to connect.
  """
  c = ml_collections.ConfigDict(dict(mode="auto", coordinator_address="", num_processes=0,
                                     process_id=-1, initialization_timeout=300))
  c.update(overrides)
  return c


@dataclasses.dataclass(frozen=True)
class Plan:
  """What ``maybe_initialize`` does.

  Attributes:
    initialize: call ``jax.distributed.initialize``.
    kwargs: its keyword arguments (only those set; JAX detects the rest).
    reason: which rule decided, for the log.
  """

  initialize: bool
  kwargs: dict[str, Any]
  reason: str


def _int(name: str, value: Any) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedConfigError(f"{name}={value!r} is not an integer") from None


def _tasks(env: Mapping[str, str], *names: str) -> int:
  for name in names:
    if env.get(name, "").strip():
      return _int(name, env[name])
  return 0


def _on_cloud_tpu_vm() -> bool:
  from jax._src import cloud_tpu_init  # noqa: PLC0415  (set at `import jax`, no backend init)
  return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def plan(section: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
         *, on_tpu_vm: bool | None = None) -> Plan:
  """Decides whether and how to initialise (pure: no JAX state is touched).

  Args:
    section: ``config.distributed`` (or None).
    env: environment (default ``os.environ``).
    on_tpu_vm: override the Cloud TPU VM detection (tests).

  Returns:
    The Plan.

  Raises:
    DistributedConfigError: an unknown mode, a partial or malformed explicit setting.
  """
  env = os.environ if env is None else env
  section = dict(section or {})
  mode = str(section.get("mode", "auto") or "auto").lower()
  if mode == "auto" and env.get(ENV_MODE, "").strip():
    mode = env[ENV_MODE].strip().lower()
  if mode not in MODES:
    raise DistributedConfigError(f"distributed mode {mode!r} (config.distributed.mode or "
                                 f"{ENV_MODE}); valid: {', '.join(MODES)}")
  timeout = _int("config.distributed.initialization_timeout",
                 section.get("initialization_timeout", 300))
  if mode == "off":
    return Plan(False, {}, f"{ENV_MODE}/config.distributed.mode=off")

  # Rule 2: explicit values (config wins over environment, per value).
  address = str(section.get("coordinator_address", "") or "") or env.get(ENV_ADDRESS, "")
  num = _int("config.distributed.num_processes", section.get("num_processes", 0) or 0)
  if not num and env.get(ENV_NUM_PROCESSES, "").strip():
    num = _int(ENV_NUM_PROCESSES, env[ENV_NUM_PROCESSES])
  pid = _int("config.distributed.process_id", section.get("process_id", -1))
  if pid < 0 and env.get(ENV_PROCESS_ID, "").strip():
    pid = _int(ENV_PROCESS_ID, env[ENV_PROCESS_ID])
  given = {ENV_ADDRESS: bool(address), ENV_NUM_PROCESSES: num > 0, ENV_PROCESS_ID: pid >= 0}
  kwargs: dict[str, Any] = {"initialization_timeout": timeout}
  if all(given.values()):
    if not 0 <= pid < num:
      raise DistributedConfigError(f"{ENV_PROCESS_ID}={pid} is not in [0, {ENV_NUM_PROCESSES}"
                                   f"={num})")
    if ":" not in address:
      raise DistributedConfigError(f"{ENV_ADDRESS}={address!r} needs a port: 'host:port'")
    kwargs |= dict(coordinator_address=address, num_processes=num, process_id=pid)
    return Plan(num > 1 or mode == "on", kwargs,
                f"{ENV_ADDRESS}={address} {ENV_NUM_PROCESSES}={num} {ENV_PROCESS_ID}={pid}")

  scheduler = (_tasks(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") > 1
               or _tasks(env, "OMPI_COMM_WORLD_SIZE") > 1)
  if any(given.values()):
    if mode == "on" or scheduler:  # JAX's scheduler detection fills in the rest
      kwargs |= {k: v for k, v in (("coordinator_address", address or None),
                                   ("num_processes", num or None),
                                   ("process_id", pid if pid >= 0 else None)) if v is not None}
      return Plan(True, kwargs, "partial explicit settings + JAX cluster detection")
    missing = [k for k, ok in given.items() if not ok]
    raise DistributedConfigError(
        f"multi-host settings are incomplete: {', '.join(missing)} not set (or the matching "
        "config.distributed key). Set all three (launch/README.md, 'Several hosts'), or "
        "none of them for a single-process run.")
  if scheduler:
    return Plan(True, kwargs, "SLURM/Open MPI with several tasks (JAX detects the rest)")
  if mode == "on":
    return Plan(True, kwargs, "mode=on (JAX detects the cluster)")
  tpu = _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm
  if tpu:
    return Plan(True, kwargs, "Cloud TPU VM (JAX reads the slice topology)")
  return Plan(False, {}, "single process (no multi-host settings)")


def maybe_initialize(config: ml_collections.ConfigDict | Mapping[str, Any] | None = None,
                     env: Mapping[str, str] | None = None) -> Plan:
  """Starts JAX's multi-host runtime if the config/environment asks for it (see module doc).

  Call before anything touches a device (``jax.devices()``, any computation).

  Args:
    config: a job config; its optional ``distributed`` section is read.
    env: environment (default ``os.environ``).

  Returns:
    The Plan that was carried out.

  Raises:
    DistributedConfigError: incomplete or malformed settings.
    RuntimeError: JAX's backends were already initialised (too late to go multi-host).
  """
  section = config.get("distributed") if config is not None else None
  p = plan(section, env)
  if not p.initialize:
    logging.info("distributed: %s", p.reason)
    return p
  if jax.distributed.is_initialized():
    logging.info("distributed: already initialised (%d processes)", jax.process_count())
    return p
  from jax._src import xla_bridge  # noqa: PLC0415
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("distributed: JAX devices were used before "
                       "maybe_initialize(); call it first (ilm_jax.main does)")
  # CPU cross-process collectives (ignored by GPU/TPU backends).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("distributed: jax.distributed.initialize(%s) [%s]", p.kwargs, p.reason)
  jax.distributed.initialize(**p.kwargs)
  logging.info("distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  quiet_non_primary()
  return p


def quiet_non_primary() -> None:
  """On processes other than 0: stdout to /dev/null and absl logging at WARNING.

  Progress lines and summaries are printed by every process running the same code; one
  copy (process 0's) is what a user wants. Warnings and errors (stderr) stay visible.
  """
  if jax.process_index() == 0:
    return
  logging.set_verbosity(logging.WARNING)
  sys.stdout.flush()
  sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (lives as long as the process)


def is_primary() -> bool:
  """True on the process that writes files meant to exist once (results, metrics)."""
  return jax.process_index() == 0
