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
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ilm_jax import benchmarking, config_lib, phase1, steps  # noqa: E402
from ilm_jax.jobs import phase1 as phase1_job  # noqa: E402

TERMS = {"itc": dict(itc_weight=1.0, itm_weight=0.0, itg_weight=0.0),
         "itm": dict(itc_weight=0.0, itm_weight=1.0, itg_weight=0.0),
         "itg": dict(itc_weight=0.0, itm_weight=0.0, itg_weight=1.0),
         "total": None}  # the config's weights, as the training step


def gradients(config_arg: str, workdir: str, cf_path: str, check: bool = False,
              eps: float = 1e-2) -> dict:
  """{'backend', 'precision', 'terms': {term: {'loss', 'norm', 'params', ['check']}}}."""
  path, _, arg = config_arg.partition(":")
  config = config_lib.load_config_file(path, arg)
  with config.unlocked():
    config.cf_path = cf_path or config.cf_path
  d = phase1_job.training_data(config, workdir)
  batch = dict(next(d.data))
  while batch.get("kind", "item_text") != "item_text":
    batch = dict(next(d.data))
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "kind"}
  model = phase1.Phase1Model(phase1_job.build_qformer(config.model, d.emb.item_emb.shape[1]),
                             d.emb.item_emb, d.emb.user_emb)
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
  parser.add_argument("--out", default="", help="write the gradients here (JSON)")
  parser.add_argument("--check", action="store_true",
                      help="also check the gradient by central differences on this backend")
  parser.add_argument("--eps", type=float, default=1e-2, help="--check's step in parameter space")
  parser.add_argument("--eager", action="store_true",
                      help="op by op (jax.disable_jit): a compiler bug shows as jit != eager")
  parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two --out files")
  args = parser.parse_args()
  if args.compare:
    compare(*args.compare)
    return 0
  with jax.disable_jit(args.eager):
    result = gradients(args.config, args.workdir, args.cf_path, args.check, args.eps)
  result["eager"] = args.eager
  benchmarking.write_json(args.out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
