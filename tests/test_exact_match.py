"""Evaluator: a hand-built model scored exactly, decoding vs. a naive loop, LoRA mixes,
teacher forcing ⇔ greedy exact match, one compilation across split sizes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_limits import data as data_lib
from lora_limits import exact_match as ev
from lora_limits import lora as lora_lib
from lora_limits import metrics as metrics_lib
from lora_limits import tokenizer as tk
from lora_limits import tree
from lora_limits.models import transformer
from lora_limits.tasks.common import Example

WORDS = "a b c d e f g h q ."
# Next word of the hand-built model; None means EOS.
SUCCESSOR = {"a": "b", "b": "c", "c": None, "d": "e", "e": ".", ".": "f", "f": "g", "g": None,
             "h": "h"}


@pytest.fixture(scope="module")
def tok():
  return tk.build([WORDS])


@pytest.fixture(scope="module")
def successor_model(tok):
  """A transformer whose greedy next token depends only on the current token (SUCCESSOR).

  Embeddings are scaled one-hots, attention and MLP write zero to the residual stream, and
  the untied head maps each one-hot to its successor's logit.
  """
  v = len(tok)
  cfg = transformer.ModelConfig(vocab_size=v, d_model=16, n_layers=1, n_heads=2, d_ff=8,
                                tie_embeddings=False)
  params = transformer.init(jax.random.key(0), cfg)
  embed = np.zeros((v, 16), np.float32)
  embed[np.arange(v), np.arange(v)] = 10.0
  head = np.zeros((16, v), np.float32)
  for i in range(v):
    word = tok.convert_ids_to_tokens(i)
    nxt = SUCCESSOR.get(word, "q") if word in SUCCESSOR else "q"
    head[i, tok.eos_token_id if nxt is None else tok.convert_tokens_to_ids(nxt)] = 1.0
  flat = tree.flatten(params)
  updates = {"embed/embedding": jnp.asarray(embed), "lm_head/kernel": jnp.asarray(head),
             "layers/0/attn/o_proj/kernel": jnp.zeros_like(flat["layers/0/attn/o_proj/kernel"]),
             "layers/0/mlp/down_proj/kernel":
                 jnp.zeros_like(flat["layers/0/mlp/down_proj/kernel"])}
  return cfg, tree.replace(params, updates)


def _ex(prompt, answer, fmt="direct", final=None, bridge=None, step=0):
  meta = {"format": fmt, "final": final or answer, "answer_type": "w"}
  if bridge is not None:
    meta.update(bridges=[bridge], bridge_steps=[step], bridge=bridge)
  return Example(prompt, answer, meta)


DIRECT = [_ex("q a", "b c"), _ex("q a", "b d"), _ex("q h", "h h")]
COT = [_ex("q d", "e . f g", "cot", "g", "e"), _ex("q d", "a . f g", "cot", "g", "a")]


def test_hand_built_model_is_scored_exactly(tok, successor_model):
  cfg, params = successor_model
  assert ev.generate(params, cfg, tok, DIRECT + COT) == ["b c", "b c", None, "e . f g",
                                                         "e . f g"]
  direct = ev.evaluate_split(params, cfg, tok, DIRECT, split="direct", chance=0.25)
  assert direct.accuracy == pytest.approx(1 / 3) and direct.n == 3
  assert direct.correct == (True, False, False)
  assert direct.chance == 0.25 and direct.bridge_accuracy is None
  cot = ev.evaluate_split(params, cfg, tok, COT, split="cot")
  assert cot.accuracy == 1.0  # both end with the right final answer
  assert cot.bridge_correct == (True, False) and cot.bridge_accuracy == 0.5
  assert cot.chance == 1.0  # one distinct final answer in the split's own answer space


def test_teacher_forced_exact_equals_greedy_exact_match(tok, successor_model):
  cfg, params = successor_model
  rows = tk.encode_examples(tok, DIRECT + COT)
  out = ev.teacher_forced(params, cfg, rows, batch_size=2)
  # Exact ⇔ the greedy continuation reproduces the whole answer and its EOS.
  np.testing.assert_array_equal(out["exact"], [True, False, False, True, False])
  assert np.all(np.isfinite(out["loss"]))
  np.testing.assert_array_equal(out["tokens"], rows["answer_len"])


def test_score_rules():
  cot = _ex("q d", "x 's b is y . y lives in z w", "cot", "z w", "y")
  assert ev.score("x 's b is y . y lives in z w", cot) == (True, True)
  assert ev.score("x 's b is k . k lives in z w", cot) == (True, False)
  assert ev.score("x 's b is y . y lives in k z w", cot) == (False, True)  # wrong anchor
  assert ev.score("x 's b is y y . y lives in z w", cot) == (True, False)  # longer bridge
  assert ev.score("u v 's b is y . y lives in q", cot) == (False, True)  # mis-copied subject
  assert ev.score("x 's b is y", cot) == (False, True)
  assert ev.score("y . lives in z w", cot) == (True, False)  # no anchor before the bridge
  assert ev.score(None, cot) == (False, False)
  math = _ex("q", "4 boxes hold 12 . 12 minus 2 is 10", "cot", "10", "12")
  assert ev.score("4 boxes hold 12 . 12 minus 2 is 10", math) == (True, True)
  assert ev.score("4 boxes hold 13 . 13 minus 2 is 11", math) == (False, False)
  direct = _ex("q", "z w")
  assert ev.score("Z  w", direct) == (True, None)  # normalised
  assert ev.score("k z w", direct) == (False, None)


def test_strict_cot_needs_the_bridge_and_the_answer_lenient_only_the_answer():
  cot = _ex("q d", "x 's b is y . y lives in z w", "cot", "z w", "y")
  gens = ["x 's b is y . y lives in z w",  # both right
          "x 's b is k . k lives in z w",  # wrong bridge, right answer
          "x 's b is y . y lives in k w",  # right bridge, wrong answer
          None]
  res = ev.score_split("test_two_hop_cot", gens, [cot] * 4, chance=0.25)
  assert res.accuracy == pytest.approx(2 / 4)  # lenient: the final answer
  assert res.bridge_accuracy == pytest.approx(2 / 4)
  assert res.strict_accuracy == pytest.approx(1 / 4)  # both
  direct = ev.score_split("d", ["z w"], [_ex("q", "z w")], chance=0.5)
  assert direct.strict_accuracy is None


def test_split_result_serialises():
  r = ev.SplitResult("test", 0.5, 2, 0.125, 1.0, (True, False), (True, True))
  d = json.loads(json.dumps(r.to_dict()))
  assert d["correct"] == [1, 0]
  assert ev.SplitResult.from_dict(d) == r


@pytest.fixture(scope="module")
def random_model():
  cfg = transformer.ModelConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                init_std=0.5)
  return cfg, transformer.init(jax.random.key(1), cfg)


def _prompts(n=5, seed=0, longest=5):
  """n prompts of 1..longest tokens (the first has `longest`, fixing the length bucket)."""
  rng = np.random.default_rng(seed)
  lengths = [longest] + [int(rng.integers(1, longest + 1)) for _ in range(n - 1)]
  pairs = [(list(rng.integers(4, 13, size=L)), [5]) for L in lengths]
  return data_lib.encode(pairs, eos_id=1, pad_id=0)


def _naive_decode(params, cfg, data, max_new, eos=1, pad=0):
  """Reference: one row at a time on the unpadded, growing sequence."""
  apply = jax.jit(lambda tokens: transformer.apply(params, cfg, tokens))
  out = np.full((data_lib.size(data), max_new), pad, np.int32)
  for i in range(data_lib.size(data)):
    seq = list(data["tokens"][i, :data["prompt_len"][i]])
    for t in range(max_new):
      nxt = int(jnp.argmax(apply(jnp.asarray([seq]))[0, -1]))
      out[i, t] = nxt
      seq.append(nxt)
      if nxt == eos:
        break
  return out


def test_greedy_decode_matches_a_naive_loop(random_model):
  cfg, params = random_model
  data = _prompts()
  got = ev.greedy_decode(params, cfg, data, max_new_tokens=4, eos_id=1, pad_id=0, batch_size=2)
  np.testing.assert_array_equal(got, _naive_decode(params, cfg, data, 4))


def _adapter(params, seed, rank=2):
  adapter = lora_lib.init(jax.random.key(seed), params, lora_lib.LoraConfig(rank=rank, alpha=2.0))
  return {p: dataclasses.replace(f, b=jax.random.normal(jax.random.key(seed + p.count("/")),
                                                        f.b.shape) * 0.5)
          for p, f in adapter.items()}


@dataclasses.dataclass(frozen=True)
class _HalfRouter:
  def __call__(self, path, x_BxTxD, factors, state):
    return jnp.full(x_BxTxD.shape[:-1] + (factors.a.shape[0],), 0.5, x_BxTxD.dtype)


def test_lora_mixes_decode_like_their_meaning(random_model):
  cfg, params = random_model
  data = _prompts(5, seed=3)
  a1, a2 = _adapter(params, 10), _adapter(params, 20)
  kw = dict(max_new_tokens=5, eos_id=1, pad_id=0, batch_size=2)
  single = ev.greedy_decode(params, cfg, data, lora=lora_lib.LoraMix.single(a1), **kw)
  merged = ev.greedy_decode(lora_lib.merge(params, a1), cfg, data, **kw)
  np.testing.assert_array_equal(single, merged)
  base = ev.greedy_decode(params, cfg, data, **kw)
  assert not np.array_equal(single, base)  # the adapter is really applied
  half = ev.greedy_decode(params, cfg, data, lora=lora_lib.LoraMix.of([a1, a2], [0.5, 0.5]),
                          **kw)
  routed = ev.greedy_decode(params, cfg, data, lora=lora_lib.LoraMix.of(
      [a1, a2], router=_HalfRouter()), **kw)
  np.testing.assert_array_equal(half, routed)
  # Per-row weights [N, K] follow their rows through the chunking.
  w = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [0, 1]], np.float32)
  per_row = ev.greedy_decode(params, cfg, data, lora=lora_lib.LoraMix.of([a1, a2], w), **kw)
  only2 = ev.greedy_decode(params, cfg, data, lora=lora_lib.LoraMix.single(a2), **kw)
  expected = np.where(w[:, :1] == 1, single, only2)
  np.testing.assert_array_equal(per_row, expected)


def test_teacher_forcing_reads_the_positions_greedy_writes(random_model):
  cfg, params = random_model
  data = _prompts(4, seed=4)
  gen = ev.greedy_decode(params, cfg, data, max_new_tokens=3, eos_id=1, pad_id=0)
  assert not (gen == 1).any()  # no early EOS, so every row has 3 generated tokens
  pairs = [(list(data["tokens"][i, :data["prompt_len"][i]]), list(gen[i])) for i in range(4)]
  rows = data_lib.encode(pairs, eos_id=1, pad_id=0)
  batch = data_lib.lm_batch(rows, loss_on="answer")
  # Drop the EOS position: the rest of the answer is exactly the greedy output.
  end = (rows["prompt_len"] + rows["answer_len"] - 2)[:, None]
  batch["weights"] = batch["weights"] * (np.arange(batch["weights"].shape[1])[None] < end)
  logits = transformer.apply(params, cfg, jnp.asarray(batch["inputs"]))
  assert np.all(metrics_lib.row_metrics(logits, batch["targets"], batch["weights"])["exact"])
  wrong = dict(batch, targets=np.where(batch["weights"] > 0, (batch["targets"] + 1) % 13,
                                       batch["targets"]))
  assert not np.any(metrics_lib.row_metrics(logits, wrong["targets"], wrong["weights"])["exact"])


def test_one_compilation_for_splits_of_any_size(random_model):
  cfg, params = random_model
  kw = dict(max_new_tokens=4, eos_id=1, pad_id=0, batch_size=4)
  ev.greedy_decode(params, cfg, _prompts(3, seed=7), **kw)
  before = ev._decode_batch._cache_size()
  ev.greedy_decode(params, cfg, _prompts(9, seed=8), **kw)
  ev.greedy_decode(params, cfg, _prompts(2, seed=9), **kw)
  assert ev._decode_batch._cache_size() == before


def test_bad_input(tok, successor_model, random_model):
  cfg, params = successor_model
  with pytest.raises(ValueError, match="empty"):
    ev.evaluate_split(params, cfg, tok, [], split="test_hop1")
  rcfg, rparams = random_model
  data = _prompts(2)
  a = _adapter(rparams, 1)
  with pytest.raises(ValueError, match="per-token"):
    ev.greedy_decode(rparams, rcfg, data, max_new_tokens=2, eos_id=1, pad_id=0,
                     lora=lora_lib.LoraMix.of([a], jnp.ones((2, 3, 1))))
  with pytest.raises(ValueError, match="rows"):
    ev.greedy_decode(rparams, rcfg, data, max_new_tokens=2, eos_id=1, pad_id=0,
                     lora=lora_lib.LoraMix.of([a], jnp.ones((3, 1))))
  with pytest.raises(ValueError, match="max_new_tokens"):
    ev.greedy_decode(rparams, rcfg, data, max_new_tokens=0, eos_id=1, pad_id=0)
