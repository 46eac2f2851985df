"""Phase 2 data: leakage, templates, loss masks, slots, truncation, chat rendering, resume."""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np
import pytest

from ilm_jax import config_lib
from ilm_jax.data import phase2, pipeline, sources
from ilm_jax.data import prompts as P
from ilm_jax.data.types import RecDataset, leave_one_out

K = 3
SPEC_TEMPLATES = {  # SPEC §5, verbatim
    ("sequential", "seen"): "Considering {dataset} user_{u} has interacted with {dataset} items "
                            "{history} . What is the next recommendation for the user ?",
    ("sequential", "unseen"): "What is the top recommended item for {dataset} user_{u} who "
                              "interacted with {dataset} item {history} ?",
    ("straightforward", "seen"): "What should we recommend for {dataset} user_{u} ?",
    ("straightforward", "unseen"): "What is the top recommendation for {dataset} user_{u} ?",
}


def _holdout_unique(ds: RecDataset) -> RecDataset:
  """Replaces every user's last two items by fresh items seen nowhere else.

  Any appearance of a validation/test item in training data is then a leak.
  """
  n = ds.num_items
  seqs, src = [], []
  for u, s in enumerate(ds.sequences):
    seqs.append(np.concatenate([s[:-2], [n + 2 * u, n + 2 * u + 1]]).astype(np.int32))
    src += [int(s[-2]), int(s[-1])]
  titles = list(ds.item_titles) + [f"Held Out {j}" for j in range(len(src))]
  text = list(ds.item_text) + [f"Held Out {j}. " + ds.item_text[i] for j, i in enumerate(src)]
  attrs = {k: list(v) + [list(v[i]) for i in src] for k, v in ds.item_attrs.items()}
  ids = np.concatenate([ds.item_ids, [f"h{j}" for j in range(len(src))]])
  out = RecDataset(name=ds.name, item_ids=ids, user_ids=ds.user_ids, sequences=seqs,
                   item_text=text, item_titles=titles, item_attrs=attrs)
  return sources.ensure_tokens(out)


@pytest.fixture(scope="module")
def data():
  cfg = config_lib.data_config("generated")
  cfg.generated.update(num_items=300, num_users=150, num_clusters=10, min_len=8, max_len=40)
  ds = _holdout_unique(sources.load_dataset(cfg))
  return ds, leave_one_out(ds)


@pytest.fixture(scope="module")
def built(smollm2_tok, data):
  ds, split = data
  enc = phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=K, max_len=320)
  samples = phase2.train_samples(ds, split, seed=3, examples_per_user=6)
  ex, dropped = phase2.encode_examples(samples, enc)
  assert dropped == 0
  return enc, samples, ex


def _answers(sample: P.Sample) -> list[str]:
  return ["".join(p for p in t.content) for t in sample.turns if t.role == "assistant"]


def _plain(ds, part) -> str:
  """A part as the text-only baseline writes it (independent of the encoder)."""
  if isinstance(part, str):
    return part
  if isinstance(part, P.Slot):
    return ""
  return " " + " , ".join(" ".join(ds.item_titles[i].split()[:8]) if part.style == "title" else
                          f"item_{ds.item_tokens[i]}" for i in part.items)


def _text_only(smollm2_tok, ds, **kw) -> phase2.PromptEncoder:
  return phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=0, user_soft_tokens=False, **kw)


# ---------------------------------------------------------------------------- leakage


def test_no_validation_or_test_item_reaches_training(smollm2_tok, data, built):
  ds, split = data
  enc, samples, ex = built
  held = set(split.valid.tolist()) | set(split.test.tolist())
  assert len(held) == 2 * ds.num_users  # unique by construction
  items = ex["slot_ids"][ex["slot_kind"] == phase2.SLOT_ITEM]
  assert not held & set(items.tolist())
  assert not held & set(ex["target_item"].tolist())
  # Nor by name anywhere in the rendered text (ids, titles), prompts or answers.
  held_tokens = {ds.item_tokens[i] for i in held}
  text = smollm2_tok.decode(ex["input_ids"][ex["attn_mask"]])
  assert not held_tokens & set(re.findall(r"item_(\d+)", text))
  assert "Held Out" not in text
  assert {P.TASK_ID[t] for t in P.TASKS} == set(ex["task"].tolist())


def test_sequential_targets_and_histories_follow_train_order(data, built):
  ds, split = data
  _, samples, ex = built
  per_user = collections.Counter()
  for r, s in enumerate(samples):
    if s.task != "sequential":
      continue
    seq = split.train[s.user].tolist()
    t = seq.index(s.target_item)
    hist = [p for p in s.turns[0].content if isinstance(p, P.History)][0].items
    assert list(hist) == seq[max(0, t - 20):t] and len(hist) >= 1
    slots = ex["slot_ids"][r][ex["slot_kind"][r] == phase2.SLOT_ITEM]
    assert slots.tolist() == list(hist)
    per_user[s.user] += 1
  assert max(per_user.values()) == 6
  assert all(per_user[u] == min(6, len(split.train[u]) - 1) for u in range(ds.num_users))


# ---------------------------------------------------------------------------- templates


def test_templates_shape():
  for task, ts in P.TEMPLATES.items():
    assert len(ts) == P.NUM_TRAIN_TEMPLATES + 1 and len(set(ts)) == len(ts), task
    for t in ts:  # the boundary rule: placeholders follow a space
      assert not re.search(r"\S\{(user|history)\}", t) and "{user}" in t
      assert ("{history}" in t) == (task == "sequential")


def test_unseen_template_never_in_training(smollm2_tok, built):
  _, samples, ex = built
  openp5 = [s for s in samples if s.task in P.OPENP5_TASKS]
  used = collections.Counter((s.task, s.template) for s in openp5)
  assert {tm for _, tm in used} == set(range(P.NUM_TRAIN_TEMPLATES))  # all 10, never 10
  assert set(ex["template"][ex["task"] < 2].tolist()) == set(range(P.NUM_TRAIN_TEMPLATES))
  text = smollm2_tok.decode(ex["input_ids"][ex["attn_mask"]])
  assert "What is the top recommend" not in text
  assert "What should we recommend for Generated user_" in text  # the seen one is trained


@pytest.mark.parametrize("task,template", list(SPEC_TEMPLATES))
def test_eval_prompts_render_the_spec_templates(smollm2_tok, data, task, template):
  """Text-only rendering == the chat template applied to the SPEC string, token for token."""
  ds, split = data
  enc = _text_only(smollm2_tok, ds, max_len=512)
  users = [0, 7]
  prompts = phase2.encode_prompts(
      phase2.eval_samples(ds, split, "test", task, template, users=users), enc)
  for r, u in enumerate(users):
    hist = split.history("test")[u][-20:]
    want = SPEC_TEMPLATES[task, template].format(
        dataset="Generated", u=ds.user_tokens[u],
        history=" , ".join(f"item_{ds.item_tokens[i]}" for i in hist))
    chat = smollm2_tok.apply_chat_template([{"role": "user", "content": want}], True)
    ids = prompts["input_ids"][r, :prompts["prompt_len"][r]]
    assert smollm2_tok.decode(ids) == chat
    assert ids.tolist() == smollm2_tok.encode(chat)  # part-wise tokenisation == whole string
    assert prompts["target_item"][r] == split.test[u]
    assert prompts["template"][r] == (P.SEEN if template == "seen" else P.UNSEEN)
  assert not prompts["attn_mask"][:, prompts["prompt_len"].max():].any()


def test_dataset_labels():
  assert [P.dataset_label(n) for n in ("ml1m", "beauty", "clothing", "yelp")] == [
      "ML1M", "Beauty", "Clothing", "Yelp"]
  with pytest.raises(ValueError):
    P.dataset_label("two words")


# ---------------------------------------------------------------------------- masks and slots


def test_loss_mask_is_exactly_the_answers(smollm2_tok, data, built):
  ds, _ = data
  enc, samples, ex = built
  strings, string_ids = phase2.item_strings(ds, smollm2_tok)
  assert not ex["loss_mask"][:, 0].any()
  assert not (ex["loss_mask"] & ~ex["attn_mask"]).any()
  for r, s in enumerate(samples):
    m = ex["loss_mask"][r]
    ids = ex["input_ids"][r]
    answers = _answers(s)
    assert smollm2_tok.decode(ids[m]) == "".join(a + "<|im_end|>" for a in answers), s.task
    # One contiguous run per assistant turn, right after the template's assistant header.
    starts = np.flatnonzero(m & ~np.roll(m, 1))
    assert len(starts) == len(answers)
    for a in starts:
      assert smollm2_tok.decode(ids[:a]).endswith("<|im_start|>assistant\n")
    if s.task in P.OPENP5_TASKS:
      assert answers == [strings[s.target_item]]
      assert ids[m].tolist() == string_ids[s.target_item] + [enc.end_id]
  # The masked_lm_loss convention: labels input_ids[:, 1:] on loss_mask[:, 1:].
  assert ex["loss_mask"].sum() == ex["loss_mask"][:, 1:].sum()


def test_slots_point_at_k_placeholders(smollm2_tok, data, built):
  ds, _ = data
  enc, samples, ex = built
  for r in range(0, len(samples), 7):
    kind, pos, idx = ex["slot_kind"][r], ex["slot_pos"][r], ex["slot_ids"][r]
    used = kind != phase2.SLOT_EMPTY
    assert (pos[~used] == -1).all() and used.tolist() == sorted(used.tolist(), reverse=True)
    covered = np.zeros(enc.max_len, bool)
    ids = ex["input_ids"][r]
    for k, p, i in zip(kind[used], pos[used], idx[used], strict=True):
      assert not covered[p:p + K].any()
      covered[p:p + K] = True
      assert (ids[p:p + K] == enc.pad_id).all() and ex["attn_mask"][r, p:p + K].all()
      before = smollm2_tok.decode(ids[max(0, p - 12):p])
      if k == phase2.SLOT_USER:
        assert i == samples[r].user and before.endswith(f"user_{ds.user_tokens[i]}")
      elif samples[r].task in P.OPENP5_TASKS:
        assert before.endswith(f"item_{ds.item_tokens[i]}")
      else:
        assert before.endswith(ds.item_titles[i][-10:])
    assert not (covered & ex["loss_mask"][r]).any()
    assert covered.sum() == K * used.sum()
  seq = ex["task"] == P.TASK_ID["sequential"]
  assert ((ex["slot_kind"][seq] == phase2.SLOT_USER).sum(1) == 1).all()


def test_soft_token_flags(smollm2_tok, data):
  ds, split = data
  samples = phase2.eval_samples(ds, split, "valid", "sequential", users=[1, 2])
  no_user = phase2.encode_prompts(
      samples, phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=K, user_soft_tokens=False))
  assert not (no_user["slot_kind"] == phase2.SLOT_USER).any()
  assert (no_user["slot_kind"] == phase2.SLOT_ITEM).sum(1).tolist() == [
      min(20, len(split.train[u])) for u in (1, 2)]
  text = phase2.encode_prompts(samples, _text_only(smollm2_tok, ds))
  assert (text["slot_kind"] == phase2.SLOT_EMPTY).all()
  assert (text["prompt_len"] == no_user["prompt_len"] - K * (no_user["slot_kind"] >= 0).sum(1)
          ).all()


# ---------------------------------------------------------------------------- truncation


def test_truncation_keeps_answer_and_recent_history(smollm2_tok, data):
  ds, split = data
  u = int(np.argmax([len(s) for s in split.train]))
  hist = split.train[u]
  assert len(hist) > 20
  s = P.openp5_sample("sequential", 3, label="Generated", user=u,
                      user_token=ds.user_tokens[u], history=hist[-20:], target=int(split.valid[u]),
                      target_token=ds.item_tokens[split.valid[u]])
  full = phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=K).render(s)[0]
  for max_len, max_slots in ((len(full) - 30, 22), (len(full), 6)):
    enc = phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=K, max_len=max_len, max_slots=max_slots)
    ex, dropped = phase2.encode_examples([s], enc)
    assert dropped == 0 and ex["attn_mask"].sum() <= max_len
    kept = ex["slot_ids"][0][ex["slot_kind"][0] == phase2.SLOT_ITEM].tolist()
    assert 1 <= len(kept) < 20 and kept == hist[-len(kept):].tolist()
    assert smollm2_tok.decode(ex["input_ids"][0][ex["loss_mask"][0]]) == _answers(s)[0] + "<|im_end|>"
    # As many items as fit: one more would not.
    one_more = dataclasses.replace(s, turns=(P.Turn("user", tuple(
        dataclasses.replace(p, items=tuple(hist[-len(kept) - 1:].tolist()))
        if isinstance(p, P.History) else p for p in s.turns[0].content)), s.turns[1]))
    ids, _, slots = phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=K).render(one_more)
    assert len(ids) > max_len or len(slots) > max_slots
  tiny = phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=K, max_len=40)
  assert phase2.encode_examples([s], tiny)[1] == 1  # cannot fit: dropped, answer never cut
  with pytest.raises(ValueError, match="do not fit"):
    phase2.encode_prompts([s], tiny)


# ---------------------------------------------------------------------------- chat rendering


def test_conversations_render_with_the_chat_template(smollm2_tok, data, built):
  ds, _ = data
  _, samples, _ = built
  enc = _text_only(smollm2_tok, ds, max_len=1024)
  conv = [s for s in samples if s.task in P.CONVERSATIONAL_TASKS]
  by_task = {s.task: s for s in conv}
  assert set(by_task) == set(P.CONVERSATIONAL_TASKS)
  multi = [s for s in conv if s.task == "multiturn"]
  assert {len(s.turns) for s in multi} == {4, 6}  # 2 and 3 exchanges
  ex, _ = phase2.encode_examples(list(by_task.values()) + multi[:3], enc)
  for r, s in enumerate(list(by_task.values()) + multi[:3]):
    msgs = [{"role": t.role, "content": "".join(_plain(ds, p) for p in t.content)}
            for t in s.turns]
    want = smollm2_tok.apply_chat_template(msgs, add_generation_prompt=False)
    ids = ex["input_ids"][r][ex["attn_mask"][r]]
    # Decoded text, not ids: punctuation after a title is tokenised on its own (a slot
    # sits there in the soft-token rendering), where the whole string may merge ")?".
    assert smollm2_tok.decode(ids) == want, s.task
    loss_text = smollm2_tok.decode(ex["input_ids"][r][ex["loss_mask"][r]])
    assert loss_text == "".join(m["content"] + "<|im_end|>" for m in msgs
                                if m["role"] == "assistant")
    for m in msgs:
      if m["role"] == "user":
        assert m["content"] not in loss_text


def test_grounded_answers(data):
  ds, split = data
  s = phase2.conversational_samples(ds, split, "attributes", 5, seed=0)
  for x in s:
    item = [p for p in x.turns[0].content if isinstance(p, P.Slot)][0].index
    title = ds.item_titles[item]
    assert len(title.split()) <= 8
    assert _answers(x)[0] == f"{title}: {P.join_list(ds.item_attrs['genres'][item])}."
  s = phase2.conversational_samples(ds, split, "taste", 3, seed=0)
  for x in s:
    hist = [p for p in x.turns[0].content if isinstance(p, P.History)][0].items
    top, c = collections.Counter(g for i in hist for g in ds.item_attrs["genres"][i]).most_common(1)[0]
    assert f"Most common genres: {top} ({c} of {len(hist)})" in _answers(x)[0]


def test_eval_prompt_is_the_training_prefix(smollm2_tok, data):
  ds, split = data
  enc = phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=K)
  for task in P.OPENP5_TASKS:
    s = phase2.eval_samples(ds, split, "valid", task, "seen", users=[4])[0]
    full, _ = phase2.encode_examples([s], enc)
    p = phase2.render_eval_prompt(s, enc)
    n = int(p["prompt_len"])
    assert (full["input_ids"][0, :n] == p["input_ids"][:n]).all()
    assert full["loss_mask"][0, n:].any() and not full["loss_mask"][0, :n].any()
    assert (p["slot_pos"] == full["slot_pos"][0]).all()
    assert smollm2_tok.decode(p["input_ids"][:n]).endswith("<|im_start|>assistant\n")
  # valid sees train only; test sees train + valid.
  v = phase2.eval_samples(ds, split, "valid", "sequential", users=[4])[0]
  t = phase2.eval_samples(ds, split, "test", "sequential", users=[4])[0]
  hv = [p for p in v.turns[0].content if isinstance(p, P.History)][0].items
  ht = [p for p in t.turns[0].content if isinstance(p, P.History)][0].items
  assert ht[-1] == split.valid[4] and hv[-1] == split.train[4][-1]


def test_item_strings_build_a_trie(smollm2_tok, data):
  from ilm_jax import generation

  ds, _ = data
  strings, ids = phase2.item_strings(ds, smollm2_tok)
  assert strings[5] == f"Generated item_{ds.item_tokens[5]}" and len(strings) == ds.num_items
  assert ids[5] == smollm2_tok.encode(strings[5])
  enc = phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=K)
  trie = generation.ItemTrie.build(ids, end_id=enc.end_id)
  assert trie.num_items == ds.num_items and enc.end_id in smollm2_tok.stop_ids


# ---------------------------------------------------------------------------- mixture, pipeline


def test_mixture_and_determinism(smollm2_tok, data):
  ds, split = data
  w = {"sequential": 1.0, "straightforward": 0.5, "describe": 0.25}
  a = phase2.train_samples(ds, split, seed=1, weights=w)
  n_seq = sum(min(10, len(s) - 1) for s in split.train)
  assert collections.Counter(s.task for s in a) == {
      "sequential": n_seq, "straightforward": round(n_seq * 0.5), "describe": round(n_seq / 4)}
  enc = phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=K)
  ea, _ = phase2.encode_examples(a, enc)
  eb, _ = phase2.encode_examples(phase2.train_samples(ds, split, seed=1, weights=w), enc)
  ec, _ = phase2.encode_examples(phase2.train_samples(ds, split, seed=2, weights=w), enc)
  assert all((ea[k] == eb[k]).all() for k in phase2.EXAMPLE_KEYS)
  assert not (ea["input_ids"].shape == ec["input_ids"].shape
              and (ea["input_ids"] == ec["input_ids"]).all())
  with pytest.raises(ValueError, match="unknown task"):
    phase2.train_samples(ds, split, weights={"chitchat": 1.0})


def test_no_text_dataset_gets_openp5_tasks_only(data):
  ds, split = data
  bare = dataclasses.replace(ds, item_text=[""] * ds.num_items, item_titles=[""] * ds.num_items,
                             item_attrs={})
  tasks = {s.task for s in phase2.train_samples(bare, split, seed=0)}
  assert tasks == set(P.OPENP5_TASKS)


def test_pipeline_batches_resume_and_shard(built):
  _, _, ex = built
  ds = phase2.phase2_dataset(ex, global_batch=8, seed=5, process_index=0, process_count=1)
  it = pipeline.to_iterator(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  it2 = pipeline.to_iterator(ds)
  it2.set_state(state)
  got = [next(it2) for _ in range(2)]
  for w, g in zip(want, got, strict=True):
    assert w["kind"] == "phase2" and w["input_ids"].shape == (8, 320)
    assert all((w[k] == g[k]).all() for k in phase2.EXAMPLE_KEYS)
  halves = [phase2.phase2_dataset(ex, global_batch=8, seed=5, process_index=p, process_count=2)[3]
            for p in (0, 1)]
  whole = ds[3]
  for k in phase2.EXAMPLE_KEYS:
    assert (np.concatenate([h[k] for h in halves]) == whole[k]).all()


def test_build_with_config(smollm2_tok, data):
  ds, split = data
  cfg = phase2.default_config()
  cfg.update(soft_tokens=2, max_len=288, examples_per_user=2, system="Be brief.")
  cfg.weights.update(describe=0.0, multiturn=0.0)
  enc, ex = phase2.build(ds, split, smollm2_tok, cfg)
  assert enc.soft_tokens == 2 and ex["input_ids"].shape[1] == 288
  assert P.TASK_ID["describe"] not in ex["task"] and P.TASK_ID["taste"] in ex["task"]
  assert smollm2_tok.decode(ex["input_ids"][0]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
