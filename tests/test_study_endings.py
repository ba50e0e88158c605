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
  c.adapters.train_ending = train_ending
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
