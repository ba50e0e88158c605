"""Word-level tokenizer: exact round trips, save/load, one vocabulary for all seeds, row layout."""

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from lora_limits import data as data_lib
from lora_limits import tokenizer as tk
from lora_limits.tasks import math_word, two_hop

TH = dict(test_chains=5, target_chains=4, filler_chains=24, pool_size=3)
MW = dict(max_factor=4, test_triples=6, scene_sentences=150, domain_problems=20)


@pytest.fixture(scope="module")
def worlds():
  return [two_hop.build(two_hop.TwoHopConfig(**TH)),
          math_word.build(math_word.MathConfig(**MW))]


@pytest.fixture(scope="module")
def tok(worlds):
  return tk.build([t for w in worlds for t in w.texts()])


def test_declared_vocabulary_covers_the_texts(worlds):
  for w in worlds:
    assert {x for t in w.texts() for x in t.split()} <= set(w.vocabulary)


def test_round_trips_every_generated_string(worlds, tok):
  texts = [t for w in worlds for t in w.texts()]
  assert tk.check_round_trip(tok, texts) == len(texts)
  assert isinstance(tok, PreTrainedTokenizerFast)
  assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)


def test_names_are_one_token_each(worlds, tok):
  e = worlds[0].splits["F"]["test_two_hop_direct"][0]
  ids = tk.encode_text(tok, e.answer)
  assert len(ids) == len(e.answer.split()) == 1


def test_save_and_load(tmp_path, worlds, tok):
  tok.save_pretrained(str(tmp_path / "tok"))
  back = tk.load(tmp_path / "tok")
  text = worlds[1].splits["math"]["test_two_hop_cot"][0].text
  assert tk.encode_text(back, text) == tk.encode_text(tok, text)
  assert tk.vocab_ids(back) == tk.vocab_ids(tok)
  assert back.eos_token_id == tok.eos_token_id


def test_vocabulary_is_the_same_for_every_seed_and_text_order():
  for build, settings, kw in ((two_hop.build, two_hop.TwoHopConfig, TH),
                              (math_word.build, math_word.MathConfig, MW)):
    w0, w1 = build(settings(**kw, seed=0)), build(settings(**kw, seed=1))
    assert w0.vocabulary == w1.vocabulary
    assert w0.corpus != w1.corpus
    tok0 = tk.build(list(w0.vocabulary))
    assert tk.vocab_ids(tok0) == tk.vocab_ids(tk.build(list(w1.vocabulary)[::-1]))
    tk.check_round_trip(tok0, w0.texts() + w1.texts())


def test_unknown_word_and_bad_input(tok):
  with pytest.raises(ValueError, match="zebra"):
    tk.encode_text(tok, "who is zebra ?")
  with pytest.raises(ValueError, match="special"):
    tk.build(["a </s> b"])
  with pytest.raises(ValueError, match="no examples"):
    tk.encode_examples(tok, [])


def test_example_rows_and_loss_weights(worlds, tok):
  examples = worlds[0].splits["H"]["hop1"][:4]
  rows = tk.encode_examples(tok, examples)
  for i, e in enumerate(examples):
    p, a = tk.encode_text(tok, e.prompt), tk.encode_text(tok, e.answer)
    row = rows["tokens"][i]
    assert row[0] == tok.bos_token_id
    assert list(row[1:1 + len(p)]) == p
    assert list(row[1 + len(p):1 + len(p) + len(a)]) == a
    assert row[1 + len(p) + len(a)] == tok.eos_token_id
    assert rows["prompt_len"][i] == 1 + len(p) and rows["answer_len"][i] == len(a) + 1
  batch = data_lib.lm_batch(rows, loss_on="answer")
  np.testing.assert_array_equal(batch["weights"].sum(1), rows["answer_len"])


def test_corpus_rows_train_every_token_and_match_question_rows(worlds, tok):
  w = worlds[0]
  probe = w.recall[0]  # a question → answer pair that is also a corpus text
  corpus_rows = tk.encode_corpus(tok, [probe.text])
  qa_rows = tk.encode_examples(tok, [probe])
  np.testing.assert_array_equal(corpus_rows["tokens"], qa_rows["tokens"])
  batch = data_lib.lm_batch(corpus_rows, loss_on="all")
  assert batch["weights"].sum() == len(probe.text.split()) + 1  # every word and EOS
  no_bos = tk.encode_corpus(tok, [probe.text], add_bos=False)
  assert no_bos["prompt_len"][0] == 1
  assert data_lib.lm_batch(no_bos, loss_on="all")["weights"].sum() == len(probe.text.split())
