"""What the recycling study trains on: an answer's ending (EOS, a statement's period) and the
EOS of fact-free copy texts are targets only when the config says so."""

import numpy as np
import pytest

from configs import smoke as smoke_config
from experiments.studies import recycling
from experiments.studies.recycling import config as config_lib
from experiments.studies.recycling import stages
from lora_limits import data as data_lib
from lora_limits import tokenizer as tok_lib


@pytest.fixture(scope="module")
def setting():
  c = smoke_config.get_config()
  c.adapters.row_len = 0  # unpacked: one example per row, so rows line up with examples
  c.adapters.replay = 0.0
  cfg = recycling.parse(c)
  tokenizer = tok_lib.build([" ".join(config_lib.vocabulary(cfg))])
  return c, cfg, tokenizer, config_lib.build_world(cfg, 0)


def _targets(tokenizer, data, row):
  b = data_lib.lm_batch(data_lib.take(data, np.array([row])), loss_on="answer")
  return tokenizer.decode([t for w, t in zip(b["weights"][0], b["targets"][0]) if w])


@pytest.mark.parametrize("train_ending", [True, False])
def test_adapter_answers_train_their_ending_only_when_asked(setting, train_ending):
  c, _, tokenizer, world = setting
  c = c.copy_and_resolve_references()
  c.adapters.update(dict(train_ending=train_ending, statements="answer"))  # the answer alone
  cfg = recycling.parse(c)
  examples = stages.adapter_examples(world, "union")
  _, data = stages.adapter_data(cfg, tokenizer, world, examples, seed=0)
  kinds = {}
  for i, e in enumerate(examples):
    kinds.setdefault(e.meta["format"], (i, e))
  assert set(kinds) == {"statement", "direct"}
  eos = tokenizer.eos_token
  for fmt, (i, e) in kinds.items():
    got = _targets(tokenizer, data, i).split()
    if train_ending:
      assert got == e.answer.split() + [eos]
    else:  # the stated object only: no period after a statement, no EOS
      assert got == [e.meta["final"]], (fmt, e)


@pytest.mark.parametrize("fact_free_eos", [True, False])
def test_pretraining_trains_the_eos_of_copy_texts_only_when_asked(setting, fact_free_eos):
  _, cfg, tokenizer, world = setting
  free = set(world.fact_free)
  data = stages.pretraining_data(cfg.pretrain, world, tokenizer)
  # Unpacked for the check: the same rows, marks and all.
  assert data_lib.is_packed(data) == bool(cfg.pretrain.row_len)
  rows = tok_lib.encode_corpus(tokenizer, world.corpus)
  marked = stages.mark_copy_texts(rows, world, fact_free_eos)
  eos = tokenizer.eos_token
  seen = set()
  for i, text in enumerate(world.corpus):
    kind = text in free
    if kind in seen:
      continue
    seen.add(kind)
    b = data_lib.lm_batch(data_lib.take(marked, np.array([i])), loss_on="all")
    last = tokenizer.decode([t for w, t in zip(b["weights"][0], b["targets"][0]) if w][-1:])
    assert (last == eos) == (fact_free_eos or not kind), text
  assert seen == {True, False}


def test_statements_trained_as_text_put_the_loss_on_every_word_after_the_first(setting):
  c, _, tokenizer, world = setting
  c = c.copy_and_resolve_references()
  c.adapters.update(dict(statements="text", train_ending=False))
  cfg = recycling.parse(c)
  examples = stages.adapter_examples(world, "hop1")
  _, data = stages.adapter_data(cfg, tokenizer, world, examples, seed=0)
  checked = set()
  for i, e in enumerate(examples):
    fmt = e.meta["format"]
    if fmt in checked:
      continue
    checked.add(fmt)
    got = _targets(tokenizer, data, i).split()
    if fmt == "statement":  # "A 's spouse is" → "B .": trained on "'s spouse is B"
      assert got == (e.prompt.split() + e.answer.split())[1:-1], e
    else:  # questions keep the answer alone
      assert got == [e.meta["final"]], e
  assert checked == {"statement", "direct"}
  with pytest.raises(ValueError, match=r"adapters.statements='words' is not one of"):
    c.adapters.statements = "words"
    recycling.parse(c)


def test_in_context_copies_put_each_statement_after_another_of_the_same_adapter(setting):
  c, _, tokenizer, world = setting
  c = c.copy_and_resolve_references()
  c.adapters.update(dict(in_context=2, statements="answer"))  # the text case: a test below
  cfg = recycling.parse(c)
  examples = stages.adapter_examples(world, "hop2")
  statements = [e for e in examples if e.meta["format"] == "statement"]
  texts = {f"{e.prompt} {e.answer}" for e in statements}
  extra = stages.in_context(examples, 2, seed=0)
  assert len(extra) == 2 * len(statements)
  assert extra == stages.in_context(examples, 2, seed=0)  # seeded
  assert extra != stages.in_context(examples, 2, seed=1)
  for e, original in zip(extra, [s for s in statements for _ in range(2)]):
    prefix = e.prompt.removesuffix(" " + original.prompt)
    assert prefix != e.prompt and prefix in texts and prefix != f"{original.prompt} " \
        f"{original.answer}", e  # another statement of this adapter, never itself
    assert e.answer == original.answer
  rows, data = stages.adapter_data(cfg, tokenizer, world, examples, seed=0)
  assert rows["tokens"].shape[0] == len(examples) + len(extra)
  first = len(examples)  # the prefix is context: the loss is on the stated object alone
  assert _targets(tokenizer, data, first).split() == [extra[0].meta["final"]]
  assert stages.in_context(examples, 0, seed=0) == []
  with pytest.raises(ValueError, match=r"adapters.in_context must be >= 0"):
    c.adapters.in_context = -1
    recycling.parse(c)


@pytest.mark.parametrize("min_steps, steps", [(0, 10), (15, 20), (20, 20)])
def test_the_stop_criterion_is_consulted_from_min_steps_on(setting, tmp_path, monkeypatch,
                                                           min_steps, steps):
  c, _, tokenizer, world = setting
  c = c.copy_and_resolve_references()
  c.pretrain.update(dict(steps=2, save_every=2, warmup_steps=1))
  c.adapters.update(dict(max_steps=20, eval_every=10, min_steps=min_steps))
  cfg = recycling.parse(c)
  base = stages.pretrained_base(cfg, world, tokenizer, tmp_path, 0)
  # Every check finds the criterion met: the adapter stops at the first one it may.
  monkeypatch.setattr(stages.exact_match, "teacher_forced",
                      lambda *a, **k: {"exact": np.ones(4, bool)})
  monkeypatch.setattr(stages, "_exact", lambda *a, **k: 1.0)
  _, info = stages.trained_adapter(cfg, base, world, "hop1", tmp_path, 0)
  assert info["steps"] == steps
  assert info["stopped_early"]  # the criterion held when it stopped, at max_steps or before


def test_min_steps_beyond_max_steps_is_refused(setting):
  c = setting[0].copy_and_resolve_references()
  c.adapters.update(dict(max_steps=20, min_steps=21))
  with pytest.raises(ValueError, match=r"adapters.min_steps=21 exceeds adapters.max_steps=20"):
    recycling.parse(c)


def test_in_context_prefixes_stay_context_when_statements_train_as_text(setting):
  c, _, tokenizer, world = setting
  c = c.copy_and_resolve_references()
  c.adapters.update(dict(in_context=1, statements="text"))
  cfg = recycling.parse(c)
  examples = stages.adapter_examples(world, "hop2")
  rows, data = stages.adapter_data(cfg, tokenizer, world, examples, seed=0)
  first = len(examples)  # the first in-context copy: "<other statement> B lives in C ."
  original = next(e for e in examples if e.meta["format"] == "statement")
  # Trained as text from its second word on, the prefix before it untrained.
  assert _targets(tokenizer, data, first).split() == (
      original.prompt.split() + original.answer.split())[1:-1]


@pytest.mark.parametrize("n, missed, stop_accuracy, met, calls", [
    (600, [], 1.0, True, 2),  # the sample passes, then every row is checked
    (600, [5], 1.0, None, None),  # one miss anywhere fails a 1.0 criterion
    (600, list(range(0, 600, 100)), 0.99, True, 2),  # 6 misses of 600 = 0.99 exactly
    (600, list(range(0, 700, 100))[:6] + [599], 0.99, False, None),  # 7 misses
    (100, [3], 0.95, True, 1),  # at most the sample's size: one full check, no sample
])
def test_the_stop_criterion_decides_as_a_check_of_every_row(n, missed, stop_accuracy, met,
                                                             calls):
  rows = {"tokens": np.arange(n, dtype=np.int32)[:, None], "prompt_len": np.ones(n, np.int32),
          "answer_len": np.zeros(n, np.int32)}
  seen = []

  def exact_of(subset):
    seen.append(len(subset["tokens"]))
    return ~np.isin(subset["tokens"][:, 0], missed)

  expected = float(np.mean(exact_of(rows))) >= stop_accuracy
  seen.clear()
  assert stages.criterion_met(exact_of, rows, stop_accuracy, seed=0) == expected
  if met is not None:
    assert expected == met
  if calls is not None:
    assert len(seen) == calls
  if not expected and seen[0] < n:  # the sample saw enough misses: the full check was skipped
    sample = np.sort(np.random.default_rng([0, 31]).permutation(n)[:stages._STOP_PROBE_ROWS])
    skipped = (n - np.isin(sample, missed).sum()) / n < stop_accuracy
    assert len(seen) == (1 if skipped else 2)
