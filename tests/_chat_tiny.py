"""A tiny servable ILM for chat/serving tests: random 2-layer Llama (SmolLM2 tokenizer),
MLP adaptor (K=2), ALS CF tables on the tiny generated catalogue. No training: fast."""

from __future__ import annotations

import functools

import ml_collections
import numpy as np

from ilm_jax import config_lib
from ilm_jax.cf import mf
from ilm_jax.chat import model as model_lib
from ilm_jax.data import sources, types
from ilm_jax.models import ilm as ilm_lib

ALS = mf.ALSConfig(dim=16, iters=4, eval_every=0)
LLM_CFG = dict(source="", tiny=True, dtype="float32", seed=0)
META = dict(variant="mlp", seed=0, retrieval_dim=32, llm=LLM_CFG, frozen=["^llm/"],
            mlp_hidden=32, mlp_tokens=2)


@functools.lru_cache(maxsize=1)
def dataset():
  return sources.load_dataset(config_lib.dataset_config("generated", tiny=True))


@functools.lru_cache(maxsize=1)
def cf_tables():
  ds = dataset()
  res = mf.train_als(types.leave_one_out(ds).train, ds.num_items, ALS)
  return np.asarray(res.item_emb, np.float32), np.asarray(res.user_emb, np.float32)


@functools.lru_cache(maxsize=1)
def llm_and_tokenizer():
  return ilm_lib.load_llm(ml_collections.ConfigDict(LLM_CFG))


def ilm():
  llm_model, _ = llm_and_tokenizer()
  items, users = cf_tables()
  return ilm_lib._build(dict(META), llm_model, items, users)


def served():
  _, tok = llm_and_tokenizer()
  return model_lib.from_dataset(ilm(), tok, dataset(), als=ALS)



@functools.lru_cache(maxsize=1)
def shared_served():
  """One ServedModel for read-only tests (server, browser); tests that add items use
  ``served()``."""
  return served()
