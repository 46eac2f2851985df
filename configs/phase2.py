r"""Phase 2 job: the ILM (Q-Former soft tokens in a frozen LLM) and its baselines.

  python -m ilm_jax.main --config=configs/phase2.py[:ARG] --workdir=DIR [--config.x=...]

ARG (comma-separated, optional, any order):
  ilm (default) | rand | mlp | text   the model (SPEC §5): Q-Former from the Phase 1
      checkpoint in DIR (or ``--config.phase1_dir``; method ilm-it / ilm-it-ii / ilm-it-ui,
      read from that dir's results.json, else ``--config.phase1_variant``); the same
      Q-Former with Phase 1's starting weights (ilm-rand); a CF -> 2-layer MLP adaptor
      (mlp); no soft tokens, items named by id only (text-only: only the retrieval head
      and its learned item table train, generation is the frozen LLM's).
  generated (default) | ml1m | beauty | clothing   the dataset.
  small  ILM-rand's Q-Former is ``configs/phase1.py:small``'s (random init, 2 layers x 128)
      instead of the default one (MiniLM init): pair it with ILM rows whose Phase 1 ran at
      the ``small`` budget, so ILM-rand is their architecture at their starting weights.
  tiny   a random 2-layer Llama (``LlmConfig.tiny``, SmolLM2's tokenizer), the tiny
      catalogue and a few steps: runs on CPU in seconds (tests).

Writes DIR/phase2/<method>/: checkpoints/ (resumable), metrics.jsonl, tb/, and the trained
state ``params`` + ``ilm.json`` (``ilm_jax.models.ilm.load_trained``), ``summary.json``.

CPU budget of the default ``:generated`` run (the README pipeline's Phase 2 stage).
Measured with ``benchmarks/phase2_step.py`` (SmolLM2-135M frozen, default-shape Q-Former,
B x T = 8 x 128, sampled-softmax retrieval): 7.7 CPU-seconds per train step, ~25
CPU-seconds to compile, 3.7 GB peak RSS -- so ~4-8 s/step wall on 2 idle cores (the shared
host measured 20 s/step at load average 19). 40 steps + loading, prompt encoding,
compilation and a 32-user validation pass fit ~5 minutes. To get there it trades away:
short prompts (``max_history`` 5 items, ``max_len`` 128, vs OpenP5's 20 items / ~320
tokens; ~13% of the generated samples -- long multi-turn/compare ones -- do not fit and
are dropped), one sampled training position per user and task, batch 8 x 40 steps = 320
examples (a tenth of one epoch of the 3.6k encoded examples), and a sampled softmax
(targets + 120 random items) instead of the full one for the retrieval head. The soft
tokens barely train in that budget: it demonstrates the pipeline, it is not a result.
The ML1M/Beauty/Clothing configs use the OpenP5 history of 20 items and 2000 steps.

Length-grouped batches (``config.batching``, on for ML1M/Beauty/Clothing). ML1M ILM prompts
(K=4) are 180 tokens long on average against T = 320 (sequential 256, straightforward 63).
Rows of similar length share a batch, and each batch is cut to a multiple of 64. Over the
first 2000 batches the mean batch length is then 210, with 20% of batches at 64 and 38% at
320. ``benchmarks/phase2_step.py --len 64,128,192,256,320`` (B = 8, SmolLM2, 2-core host,
2026-11-26) measured 3.8 / 7.2 / 10.7 / 16.4 / 19.5 CPU-s per step at those lengths, so a
step costs 12.7 CPU-s on average instead of 19.5 (1.54x), plus four more compilations of
~20 s. The loss of a cut batch equals the padded batch's (``tests/test_ilm.py``).
"""

from __future__ import annotations

import pathlib

import ml_collections

from ilm_jax import config_lib, optim, train
from ilm_jax.data import phase2 as data_phase2

VARIANTS = ("ilm", "rand", "mlp", "text")
DATASETS = ("generated", "ml1m", "beauty", "clothing")
_HERE = pathlib.Path(__file__).resolve().parent

# Params that never train, per variant (``partition.trainable_filter`` regexes). The
# Q-Former's text branch is unused by the query-only pass (see models/ilm.py).
FROZEN = {
    "ilm": ("^llm/", r"^encoder/qformer/(embeddings|text_proj|item_proj|itm_head|lm_head|temp)"),
    "rand": ("^llm/", r"^encoder/qformer/(embeddings|text_proj|item_proj|itm_head|lm_head|temp)"),
    "mlp": ("^llm/",),
    "text": ("^llm/",),
}


def _phase1_model(arg: str) -> ml_collections.ConfigDict:
  """``configs/phase1.py``'s model section: ILM-rand is that architecture, untrained."""
  return config_lib.load_config_file(_HERE / "phase1.py", arg).model


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The phase2 job's config; ``arg`` as in the module docstring."""
  dataset, parts = config_lib.parse_config_arg(
      arg, config_file="configs/phase2.py", flags=("tiny", "small", *VARIANTS),
      datasets=DATASETS)
  variant = config_lib.pick_one(parts, VARIANTS, "ilm", config_file="configs/phase2.py",
                                what="variant")
  tiny = "tiny" in parts

  c = ml_collections.ConfigDict()
  c.job = "phase2"
  c.variant = variant
  c.method = ""            # '' = from the variant (and the Phase 1 dir for 'ilm')
  c.phase1_dir = ""        # '' = WORKDIR (where the phase1 job leaves its Q-Former)
  c.phase1_variant = "it_ii"  # names the method when the Phase 1 dir does not say
  c.data = config_lib.dataset_config(dataset, tiny=tiny)
  c.data_dir = ""          # prepared data folder; '' = WORKDIR/data/<dataset>
  # CF embeddings: this npz if set; else <Phase 1 dir or WORKDIR>/cf/embeddings.npz; else
  # weighted ALS is trained there (same settings as the phase1 job).
  c.cf_path = ""
  c.mf = ml_collections.ConfigDict(dict(
      dim=16 if tiny else 64, reg=1.0, alpha=10.0, iters=3 if tiny else 10, seed=0,
      init_scale=0.01, eval_every=0, patience=0, chunk_floats=1 << 23))
  c.seed = 0               # init of the new params (projection, MLP, retrieval head)

  # Frozen LLM: '' = packaged SmolLM2-135M-Instruct GGUF; or a .gguf / HF folder.
  c.llm = ml_collections.ConfigDict(dict(source="", tiny=tiny, dtype="float32", seed=0))
  size = ["tiny"] if tiny else ["small"] if "small" in parts else []
  c.qformer = _phase1_model(",".join([dataset] + size))  # the 'rand' variant's Q-Former
  c.mlp = ml_collections.ConfigDict(dict(hidden=512, num_tokens=4))
  # Retrieval head loss: 'full' = softmax over every item (the item encoder runs on the
  # whole catalogue each step); 'batch' = the batch's targets + num_negatives sampled items.
  # weight: at 1 the retrieval loss keeps generation from learning item ids, even on 64
  # memorised examples; at 0.1 the head still memorises them and generation learns part; at
  # 0 generation learns most (benchmarks/phase2_memorise.py, docs/RESULTS.md). Lower it
  # when beam search matters. detach: the retrieval loss trains only the head, so the
  # soft tokens are shaped by the LM loss alone (generation trains as at weight 0); on the
  # generated catalogue's test users (600 steps) the detached head ranked about as well. On
  # ML1M (one epoch, batch 32; docs/results/runs.md, E1) the detached head's HR@5 was about
  # half the joint one's, generation stayed at chance, and the language metrics rose most.
  c.retrieval = ml_collections.ConfigDict(dict(
      dim=256, weight=1.0, candidates="batch", num_negatives=120, detach=False))

  generated = dataset == "generated"
  c.prompts = ml_collections.ConfigDict(dict(
      max_len=128 if generated else 320, max_slots=8 if generated else 22,
      max_history=5 if generated else data_phase2.MAX_HISTORY,
      examples_per_user=1 if generated else 10, user_soft_tokens=True, seed=0))
  c.prompts.weights = ml_collections.ConfigDict(dict(data_phase2.DEFAULT_WEIGHTS))
  c.batch_size = 8
  # Training batches of similar lengths (rows sorted by length in windows of group_by_length
  # batches, batch order shuffled; 0 = plain shuffle), each cut to its longest row rounded up
  # to pad_multiple (0 = every batch [B, max_len]). ML1M with K=4: 1.5x fewer padded tokens
  # than [B, 320], 5 step shapes to compile. Off for the generated catalogue: its 40 steps at
  # T=128 would save about what the second compile costs.
  c.batching = ml_collections.ConfigDict(dict(
      group_by_length=0 if generated else 50, pad_multiple=0 if generated else 64))
  c.loss = ml_collections.ConfigDict(dict(
      label_smoothing=0.0,
      max_answer_tokens=-1))  # -1 = the longest answer in the data; 0 = all positions

  steps = 40 if generated else 2000
  c.train = train.default_config(
      total_steps=steps, log_every=10, checkpoint_every=0 if generated else 500,
      eval_every=0, seed=0, jit_init=False, frozen=FROZEN[variant],
      optimizer=optim.default_config(lr=3e-4 if generated else 1e-4,
                                     warmup_steps=5 if generated else 100, weight_decay=0.05))
  # Retrieval-head validation (HR/NDCG on valid targets) on a fixed user sample; every
  # eval_every steps and at the end. max_users 0 = off.
  c.eval = ml_collections.ConfigDict(dict(max_users=32 if generated else 256, batch_size=16,
                                         seed=0))

  if tiny:
    c.prompts.update(dict(max_len=96, max_slots=6, max_history=3, examples_per_user=1))
    c.mlp.update(dict(hidden=32, num_tokens=2))
    c.retrieval.dim = 32
    c.batch_size = 8
    c.train.update(dict(total_steps=12, log_every=4, checkpoint_every=0))
    c.train.optimizer.update(dict(lr=3e-3, warmup_steps=2))
    c.eval.update(dict(max_users=16, batch_size=8))
  return c
