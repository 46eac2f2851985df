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


@functools.lru_cache(maxsize=1)
def ilm():
  """The (cached) tiny ILM; ServedModel.add_item never mutates it."""
  llm_model, _ = llm_and_tokenizer()
  items, users = cf_tables()
  return ilm_lib._build(dict(META), llm_model, items, users)


def served():
  """A fresh ServedModel (own catalogue and tables) over the cached ILM; the item tokens
  are computed by the encoder the first time only."""
  _, tok = llm_and_tokenizer()
  base = shared_served() if shared_served.cache_info().currsize else None
  if base is None:
    return model_lib.from_dataset(ilm(), tok, dataset(), als=ALS)
  ds = dataset()
  return model_lib.ServedModel(
      ilm(), tok, model_lib.catalogue_lib.Catalogue.from_dataset(ds),
      histories=base.histories, label=base.label, user_tokens=ds.user_tokens,
      item_tokens=base.item_tokens[:ds.num_items].copy(),
      item_keys=base.item_keys[:ds.num_items].copy(), als=ALS)



@functools.lru_cache(maxsize=1)
def shared_served():
  """One ServedModel for read-only tests (server, browser); tests that add items use
  ``served()``."""
  _, tok = llm_and_tokenizer()
  return model_lib.from_dataset(ilm(), tok, dataset(), als=ALS)
