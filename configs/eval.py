r"""Eval job: OpenP5 ranking, retrieval head, language metrics and preservation of the
trained Phase 2 models in a workdir.

  python -m ilm_jax.main --config=configs/eval.py[:ARG] --workdir=DIR [--config.x=...]

Reads every trained model under DIR/phase2/<method>/ (``models.ilm.load_trained``; or only
``--config.methods=ilm-it-ii,mlp``) and writes one SPEC §8 record per (method, task,
template, scorer) to DIR/results.json -- method ``<m>`` for trie-constrained beam search,
``<m>+retrieval`` for the retrieval head -- plus a ``language`` record (semantic
consistency, reference log-likelihood) and a ``preservation`` record (text-only logits ==
the base LLM's; the job fails when they differ) per method. Generated answers go to
DIR/eval/<method>/language_samples.jsonl.

ARG (comma-separated, optional, any order):
  generated (default) | ml1m | beauty | clothing | movielens   the dataset.
  tiny   the tiny catalogue and a 16-user sample (tests; pairs with configs/phase2.py:tiny).
  sequential | straightforward   only these tasks (default both).
  seen | unseen   only these templates (default both).
  generation | retrieval   only these scorers (default both).
  nolanguage   skip the language metrics.
  text-only | mlp | ilm-rand | ilm-it | ilm-it-ii | ilm-it-ui   only these methods.

Only the language metrics: ``--config.tasks= --config.scorers=`` (no ranking task, no scorer;
add ``--config.preservation=False`` to skip that check too). Text-only has no soft tokens, so
its language record is the frozen LLM's on the text prompts, however long it trained.

Users: ``max_users`` > 0 evaluates a fixed seeded subsample (the same users for every
method, task and scorer; reported as ``users`` and ``subsample`` in each record).
"""

from __future__ import annotations

import pathlib

import ml_collections

from ilm_jax import config_lib

TASKS = ("sequential", "straightforward")
TEMPLATES = ("seen", "unseen")
SCORERS = ("generation", "retrieval")
METHODS = ("text-only", "mlp", "ilm-rand", "ilm-it", "ilm-it-ii", "ilm-it-ui")
LANGUAGE_TASKS = ("describe", "attributes", "compare", "taste", "reason")
_HERE = pathlib.Path(__file__).resolve().parent


def _phase2_prompts(arg: str) -> ml_collections.ConfigDict:
  """``configs/phase2.py``'s prompt settings: evaluation renders prompts as training did."""
  return config_lib.load_config_file(_HERE / "phase2.py", arg).prompts


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The eval job's config; ``arg`` as in the module docstring."""
  words = ("tiny", "nolanguage") + TASKS + TEMPLATES + SCORERS + METHODS
  dataset, flags = config_lib.parse_config_arg(arg, config_file="configs/eval.py", flags=words)
  tiny = "tiny" in flags
  pick = lambda options: ",".join([o for o in options if o in flags] or options)  # noqa: E731

  c = ml_collections.ConfigDict()
  c.job = "eval"
  c.data = config_lib.dataset_config(dataset, tiny=tiny)
  c.data_dir = ""        # prepared data folder; '' = WORKDIR/data/<dataset>
  c.methods = ",".join(m for m in METHODS if m in flags)  # '' = every model in DIR/phase2
  c.split = "test"       # 'valid' evaluates validation targets (history = train)
  c.tasks = pick(TASKS)
  c.templates = pick(TEMPLATES)
  c.scorers = pick(SCORERS)
  # 0 = every user; else a fixed seeded subsample (reported in each record).
  # The generated default is the README pipeline's eval stage, sized for its CPU budget
  # (SmolLM2-135M on 2 cores: ~1 user/s with beam search; benchmarks/phase2.py).
  c.max_users = 16 if tiny else (50 if dataset == "generated" else 0)
  c.seed = 0
  c.batch_size = 16      # users per beam-search / retrieval call
  c.beam_size = 10       # OpenP5: 10
  c.progress_every_s = 30.0
  # How prompts are rendered: the phase2 config's settings for the same dataset (K comes
  # from the trained model). Keep them equal to what the model was trained with.
  p2 = "ml1m" if dataset == "movielens" else dataset  # phase2 names MovieLens-1M 'ml1m'
  c.prompts = _phase2_prompts(",".join([p2] + (["tiny"] if tiny else [])))
  c.language = ml_collections.ConfigDict(dict(
      # held-out samples per task
      count=0 if "nolanguage" in flags else (2 if tiny else 4 if dataset == "generated" else 16),
      tasks=",".join(LANGUAGE_TASKS), max_new_tokens=8 if tiny else 48, batch_size=8,
      seed=1234))
  c.preservation = True  # text-only logits == base LLM logits (the job fails otherwise)
  return c
