r"""Phase 1 job: train the Q-Former item encoder (item-text + item-item / user-item).

  python -m ilm_jax.main --config=configs/phase1.py[:ARG] --workdir=DIR [--config.x=...]

ARG (comma-separated, optional, any order):
  it | it_ii (default) | it_ui   the variant: ITC+ITM+ITG only, plus the item-item loss,
      or plus the user-item loss (SPEC §4). IT trains on exactly the item-text batches
      IT-II / IT-UI see (same seeds, same order) without the pair batches in between.
  generated (default) | ml1m | beauty | clothing   the dataset (OpenP5 shared copies for
      the last three; any OpenP5 folder: ``--config.data.source=openp5 --config.data.dir=P``).
  tiny   small random-init model, tiny catalogue, few steps: runs on CPU in seconds (tests).
  small  a CPU-budget run (random init, 2 layers, 128 wide, batch 32, ITG on 8 rows of each
      batch, 200 item-text steps) on the full dataset: what docs/PHASE1.md compares on a
      shared 2-core machine.

Writes DIR/results.json (task ``phase1``, methods ``ilm-it`` / ``ilm-it-ii`` / ``ilm-it-ui``),
DIR/phase1/params + DIR/phase1/qformer_config.json (``ilm_jax.phase1.load_qformer``),
DIR/checkpoints (resumable), DIR/metrics.jsonl and DIR/tb.
"""

from __future__ import annotations

import ml_collections

from ilm_jax import config_lib, optim, phase1, train

VARIANTS = phase1.VARIANTS
DATASETS = ("generated", "ml1m", "beauty", "clothing")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The phase1 job's config; ``arg`` as in the module docstring."""
  dataset, parts = config_lib.parse_config_arg(
      arg, config_file="configs/phase1.py", flags=("tiny", "small", *VARIANTS),
      datasets=DATASETS)
  variant = config_lib.pick_one(parts, VARIANTS, "it_ii", config_file="configs/phase1.py",
                                what="variant")
  tiny = "tiny" in parts
  small = "small" in parts

  c = ml_collections.ConfigDict()
  c.job = "phase1"
  c.variant = variant
  c.data = (config_lib.data_config("generated") if dataset == "generated"
            else config_lib.data_config("openp5", name=dataset))

  # CF embeddings: this npz if set; else WORKDIR/cf/embeddings.npz if present; else
  # weighted ALS (ilm_jax.cf.mf) is trained on the train split here and saved there.
  c.cf_path = ""
  c.data_dir = ""  # prepared data folder; '' = WORKDIR/data/<dataset> (jobs/prepare.py)
  c.mf = ml_collections.ConfigDict(dict(
      dim=64, reg=1.0, alpha=10.0, iters=10, seed=0, init_scale=0.01, eval_every=0,
      patience=0, chunk_floats=1 << 23))

  # Items whose text never trains (item-text batches skip them); item<->text recall and
  # the ITG loss are measured on them. Their CF vectors still appear in II/UI pairs.
  c.heldout_fraction = 0.1
  c.heldout_seed = 0

  c.pipeline = ml_collections.ConfigDict(dict(
      text_max_len=48 if dataset == "generated" else 64,
      text_batch=64, pair_batch=64, window=3, seed=0,
      # item-item pairs once each (True) or once per co-occurrence (False)
      dedup_pairs=False))

  # Q-Former: init 'minilm' (all-MiniLM-L6-v2 text tower), 'random', or a local BERT
  # folder (config.json + model.safetensors; num_layers = the first N of its layers).
  c.model = ml_collections.ConfigDict(dict(
      init="minilm", num_layers=0,  # 0 = all checkpoint layers (random init: 6)
      num_query_tokens=4, num_memory_tokens=1, cross_attention_frequency=2, proj_dim=256,
      # init stddev of the (new) cross-attention layers; 0 = BERT's 0.02 as BLIP-2. ~1/sqrt(H)
      # doubles ML1M item-item recall at the `small` budget (docs/PHASE1.md).
      cross_init_std=0.0,
      # used by init='random' only (MiniLM / BERT shapes come from the checkpoint):
      hidden_size=384, num_heads=12, intermediate_size=1536, seed=0))

  c.loss = ml_collections.ConfigDict(dict(
      itc=1.0, itm=1.0, itg=1.0, label_smoothing=0.1,
      itg_rows=0,  # ITG on the first N rows of a batch only (0 = all; CPU budget knob)
      pair=1.0,   # weight of the II / UI loss
      # logQ correction of the II / UI in-batch softmax: each candidate's logit minus the
      # log of how often it is drawn (docs/PHASE1.md, "logQ correction")
      pair_logq=False))

  # total_steps counts every update; IT runs half as many (only its item-text steps).
  steps = 600
  c.train = train.default_config(
      total_steps=steps if variant == "it" else 2 * steps, log_every=20, checkpoint_every=200,
      eval_every=0, seed=0, jit_init=False,
      optimizer=optim.default_config(lr=1e-4, warmup_steps=50, weight_decay=0.05))

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=256,
      max_candidates=2000,   # texts/items ranked in the *_full retrieval metrics
      max_pairs=5000,        # held-out (valid, test) item pairs for II recall@10 (seeded)
      max_cluster_items=2000,
      untrained=True,        # also evaluate the init (results: untrained_<metric>)
      seed=0))

  if small:
    c.pipeline.update(dict(text_batch=32, pair_batch=32, text_max_len=40))
    c.loss.itg_rows = 8
    c.model.update(dict(init="random", num_layers=2, hidden_size=128, num_heads=4,
                        intermediate_size=512))
    steps = 200
    c.train.update(dict(total_steps=steps if variant == "it" else 2 * steps, log_every=20,
                        checkpoint_every=100))
    c.train.optimizer.update(dict(lr=5e-4, warmup_steps=30))
  if tiny:
    if dataset == "generated":
      c.data.generated.update(dict(num_items=200, num_users=300, num_clusters=10))
    c.mf.update(dict(dim=16, iters=3))
    c.heldout_fraction = 0.2
    c.pipeline.update(dict(text_max_len=32, text_batch=16, pair_batch=16))
    c.model.update(dict(init="random", num_layers=2, hidden_size=64, num_heads=4,
                        intermediate_size=128, proj_dim=32))
    steps = 60
    c.train.update(dict(total_steps=steps if variant == "it" else 2 * steps, log_every=10,
                        checkpoint_every=0))
    c.train.optimizer.update(dict(lr=1e-3, warmup_steps=10))
    c.eval.update(dict(batch_size=64))
  return c
