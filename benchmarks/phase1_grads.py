r"""Phase 1's first-step gradient, per loss and per parameter, checked and compared across backends.

Phase 1 learns item-text alignment on CPU but not on an H200 (docs/results/runs.md): the first
step has the same losses on both (to 1e-6, the same ITM pairs included) and a different gradient
norm (2.32 vs 8.30); the item-item step's norm agrees (0.1360 vs 0.1362). This computes the
gradient of the first item-text batch, with the training step's own rng
(``fold_in(key(train.seed), 0)``), for each loss term (ITC, ITM, ITG) and their sum, and

* prints and saves its norm per parameter, so a CPU file and a GPU file can be diffed;
* with ``--check``, tests it on the backend it runs on, without a reference file: the
  directional derivative along the unit gradient, measured by central differences of the loss
  (step ``--eps`` in parameter space), must equal the gradient's norm. A backward pass that is
  wrong on one backend fails here even when its forward pass (the loss) is right.

  python benchmarks/phase1_grads.py --config=configs/phase1.py:it_ii,ml1m,small \
      --cf_path=W/cf/embeddings.npz --workdir=/tmp/g1 --check --out=grads_cpu.json
  (GPU: the same, then with JAX_DEFAULT_MATMUL_PRECISION=highest) ... --out=grads_gpu.json
  python benchmarks/phase1_grads.py --compare grads_cpu.json grads_gpu.json

* with ``--stages``, localises an ITC backward that differs between backends: it splits the
  ITC term into pieces (the head from features to loss, the L2-normalised projections, the
  query pass, the CF-memory projection, the text pass), jits each piece on its own, chains
  their pullbacks, and does this on the default backend and on the CPU backend of the same
  process. It prints each cotangent and parameter gradient on both with their relative
  difference, and the fused ITC gradient (one jit, as in training) beside the chained one:
  a piece that differs alone is a kernel bug; fused != chained on one backend only is a
  fusion bug across the pieces.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ilm_jax import benchmarking, config_lib, losses, masks, phase1, steps  # noqa: E402
from ilm_jax.jobs import phase1 as phase1_job  # noqa: E402
from ilm_jax.models import qformer as qformer_lib  # noqa: E402

TERMS = {"itc": dict(itc_weight=1.0, itm_weight=0.0, itg_weight=0.0),
         "itm": dict(itc_weight=0.0, itm_weight=1.0, itg_weight=0.0),
         "itg": dict(itc_weight=0.0, itm_weight=0.0, itg_weight=1.0),
         "total": None}  # the config's weights, as the training step


def gradients(config_arg: str, workdir: str, cf_path: str, check: bool = False,
              eps: float = 1e-2, overrides: Sequence[str] = ()) -> dict:
  """{'backend', 'precision', 'terms': {term: {'loss', 'norm', 'params', ['check']}}}."""
  config, model, batch = _first_item_text_batch(config_arg, workdir, cf_path, overrides)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = jax.random.fold_in(jax.random.key(int(config.train.seed)), 0)  # the first step's
  out = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
         "precision": str(jax.config.jax_default_matmul_precision), "terms": {}}
  lc = config.loss
  for term, weights in TERMS.items():
    weights = weights or dict(itc_weight=float(lc.itc), itm_weight=float(lc.itm),
                              itg_weight=float(lc.itg))
    loss_fn = phase1.loss_fns(None, label_smoothing=float(lc.label_smoothing),
                              itg_rows=int(lc.itg_rows), **weights)["item_text"]

    @jax.jit
    def loss_of(params, loss_fn=loss_fn):
      return loss_fn(nnx.merge(graphdef, params, rest, copy=True), batch, rng)[0]

    if check:
      grads, c = steps.gradient_check(loss_of, params, eps)
      loss = c["loss"]
    else:
      loss, grads = jax.jit(jax.value_and_grad(loss_of))(params)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))
    norms = {jax.tree_util.keystr(p): float(np.linalg.norm(np.asarray(g))) for p, g in leaves}
    total = float(np.sqrt(sum(v * v for v in norms.values())))
    out["terms"][term] = {"loss": float(loss), "norm": total, "params": norms}
    line = f"{term:>5}: loss {float(loss):.6f}  grad norm {total:.6f}"
    if check:
      out["terms"][term]["check"] = c
      line += (f"  | along it: numeric {c['numeric']:.6f} ± {c['resolution']:.1e}"
               f" (rel err {c['rel_err']:.1e})")
    print(line, flush=True)
  return out


def _first_item_text_batch(config_arg: str, workdir: str, cf_path: str,
                           overrides: Sequence[str] = ()):
  """(config, model, the first item-text batch as jnp arrays) as the training job builds them.

  ``overrides`` are ``KEY=VALUE`` strings (``model.cross_init_std=0.088``), as ``--config.KEY``.
  """
  try:
    config = config_lib.load_config(config_arg, overrides)
  except config_lib.ConfigError as e:
    raise SystemExit(f"--set {e}") from None
  with config.unlocked():
    config.cf_path = cf_path or config.cf_path
  d = phase1_job.training_data(config, workdir)
  batch = dict(next(d.data))
  while batch.get("kind", "item_text") != "item_text":
    batch = dict(next(d.data))
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "kind"}
  model = phase1.Phase1Model(phase1_job.build_qformer(config.model, d.emb.item_emb.shape[1]),
                             d.emb.item_emb, d.emb.user_emb)
  return config, model, batch


def itc_stages(config_arg: str, workdir: str, cf_path: str,
               overrides: Sequence[str] = ()) -> dict:
  """The ITC gradient piece by piece on the default and the CPU backend (``--stages``).

  Returns:
    {'backends': [default, 'cpu'], 'rows': [(name, norm on each, rel diff)]}.
  """
  config, model, batch = _first_item_text_batch(config_arg, workdir, cf_path, overrides)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  smoothing = float(config.loss.label_smoothing)
  items, ids, valid = batch["item"], batch["input_ids"], batch["input_mask"]

  def pure(fn):  # (params, rest, *args) -> fn(model, *args), jitted on its own
    return jax.jit(lambda p, r, *a: fn(nnx.merge(graphdef, p, r, copy=True), *a))

  memory_of = pure(lambda m, it: m.item_memory(it))
  query_of = pure(lambda m, mem: m.qformer.query_pass(mem))
  item_head_of = pure(lambda m, q: qformer_lib.l2_normalize(m.qformer.item_proj(q)))
  cls_of = pure(lambda m, i, v: m.qformer.text_pass(i, v)[:, 0])
  text_head_of = pure(lambda m, c: qformer_lib.l2_normalize(m.qformer.text_proj(c)))
  temp_of = pure(lambda m: m.qformer.temperature())

  @jax.jit
  def head(item_feats, text_feats, temp, d_simq, d_sim, items):
    """ITC loss from the features, with zero probes on the per-query and max similarities."""
    simq = losses.itc_sim_per_query(item_feats, text_feats) + d_simq
    sim = losses.max_over(simq) / temp + d_sim
    return losses.itc_loss(sim, masks.false_negative_mask(items, items), smoothing)[0]

  fused = pure(lambda m, b: phase1.item_text_loss(
      m, b, jax.random.key(0), itc_weight=1.0, itm_weight=0.0, itg_weight=0.0,
      label_smoothing=smoothing)[0])

  def run(device) -> dict[str, np.ndarray]:
    p, r, it, i, v = jax.device_put((params, rest, items, ids, valid), device)
    out = {}
    mem, pb_mem = jax.vjp(lambda p_: memory_of(p_, r, it), p)
    q, pb_q = jax.vjp(lambda p_, m_: query_of(p_, r, m_), p, mem)
    feats_i, pb_fi = jax.vjp(lambda p_, q_: item_head_of(p_, r, q_), p, q)
    cls, pb_cls = jax.vjp(lambda p_: cls_of(p_, r, i, v), p)
    feats_t, pb_ft = jax.vjp(lambda p_, c_: text_head_of(p_, r, c_), p, cls)
    temp, pb_temp = jax.vjp(lambda p_: temp_of(p_, r), p)
    b, k = feats_i.shape[:2]
    zeros_q = jnp.zeros((b, b, k), jnp.float32, device=device)
    zeros_s = jnp.zeros((b, b), jnp.float32, device=device)
    loss, g = jax.value_and_grad(head, argnums=(0, 1, 2, 3, 4))(
        feats_i, feats_t, temp, zeros_q, zeros_s, it)  # every input on `device`
    out["loss"] = np.asarray(loss)
    out["d sim_i2t (after max, /temp)"], out["d sim per query"] = g[4], g[3]
    out["d item_feats"], out["d text_feats"], out["d temp"] = g[0], g[1], g[2]
    gp_fi, out["d query outputs"] = pb_fi(g[0])
    gp_q, out["d memory"] = pb_q(out["d query outputs"])
    (gp_mem,) = pb_mem(out["d memory"])
    gp_ft, out["d text [CLS]"] = pb_ft(g[1])
    (gp_cls,) = pb_cls(out["d text [CLS]"])
    (gp_temp,) = pb_temp(g[2])
    pieces = {"item_proj + l2": gp_fi, "query pass": gp_q, "memory proj": gp_mem,
              "text_proj + l2": gp_ft, "text pass": gp_cls, "temp": gp_temp}
    chained = jax.tree.map(lambda *xs: sum(xs), *pieces.values())
    for name, tree in pieces.items():
      out[f"params via {name}"] = _flat(tree)
    out["params, chained"] = _flat(chained)
    out["params, fused (one jit)"] = _flat(jax.grad(fused)(p, r, jax.device_put(batch, device)))
    return {name: np.asarray(x, np.float64) for name, x in out.items()}

  devices = [jax.devices()[0], jax.devices("cpu")[0]]
  results = [run(dev) for dev in devices]
  rows = []
  for name in results[0]:
    a, c = results[0][name], results[1][name]
    rel = float(np.linalg.norm(a - c) / max(np.linalg.norm(c), 1e-30))
    rows.append((name, float(np.linalg.norm(a)), float(np.linalg.norm(c)), rel))
  return {"backends": [devices[0].platform, devices[1].platform], "rows": rows}


def _flat(tree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def compare(a_path: str, b_path: str, top: int = 15) -> None:
  """Prints per term the loss, the norm and the parameters whose gradients differ most."""
  a, b = (json.loads(pathlib.Path(p).read_text()) for p in (a_path, b_path))
  print(f"A = {a_path} ({a['device']}, precision {a['precision']}); "
        f"B = {b_path} ({b['device']}, precision {b['precision']})")
  for term in TERMS:
    if term not in a["terms"] or term not in b["terms"]:
      continue
    ta, tb = a["terms"][term], b["terms"][term]
    print(f"\n{term}: loss {ta['loss']:.6f} vs {tb['loss']:.6f}; "
          f"grad norm {ta['norm']:.6f} vs {tb['norm']:.6f}")
    rows = sorted(((abs(np.log((tb["params"][k] + 1e-12) / (v + 1e-12))), k, v,
                    tb["params"][k]) for k, v in ta["params"].items()), reverse=True)
    for _, k, va, vb in rows[:top]:
      print(f"  {va:12.6g} {vb:12.6g}  {k}")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/phase1.py:it_ii,ml1m,small")
  parser.add_argument("--workdir", default="/tmp/phase1_grads")
  parser.add_argument("--cf_path", default="", help="CF embeddings npz (else trained in workdir)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. model.cross_init_std=0.088 (repeatable)")
  parser.add_argument("--out", default="", help="write the gradients here (JSON)")
  parser.add_argument("--check", action="store_true",
                      help="also check the gradient by central differences on this backend")
  parser.add_argument("--eps", type=float, default=1e-2, help="--check's step in parameter space")
  parser.add_argument("--eager", action="store_true",
                      help="op by op (jax.disable_jit): a compiler bug shows as jit != eager")
  parser.add_argument("--stages", action="store_true",
                      help="ITC backward piece by piece, this backend against its CPU backend")
  parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two --out files")
  args = parser.parse_args()
  if args.compare:
    compare(*args.compare)
    return 0
  if args.stages:
    result = itc_stages(args.config, args.workdir, args.cf_path, args.set)
    a, c = result["backends"]
    print(f"ITC backward by pieces: {a} vs {c}; rel diff = |{a} - {c}| / |{c}|")
    print(f"  {'':34s} {'|' + a + '|':>12s} {'|' + c + '|':>12s} {'rel diff':>9s}")
    for name, na, nc, rel in result["rows"]:
      print(f"  {name:34s} {na:12.6g} {nc:12.6g} {rel:9.2e}")
    benchmarking.write_json(args.out, result)
    return 0
  with jax.disable_jit(args.eager):
    result = gradients(args.config, args.workdir, args.cf_path, args.check, args.eps,
                       args.set)
  result["eager"] = args.eager
  benchmarking.write_json(args.out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
