"""Sequence packing: a packed row gives exactly the logits and loss of its sequences alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_limits import data as data_lib
from lora_limits import lora as lora_lib
from lora_limits import metrics as metrics_lib
from lora_limits import train as train_lib
from lora_limits.models import transformer

PAD, EOS = 0, 1


def _dataset(lengths, seed=0, vocab=40):
  rng = np.random.default_rng(seed)
  pairs = []
  for n in lengths:
    ids = rng.integers(4, vocab, size=n).tolist()
    pairs.append((ids[:2], ids[2:]))
  return data_lib.encode(pairs, eos_id=EOS, pad_id=PAD)


def test_pack_places_every_sequence_once_and_whole():
  data = _dataset([5, 9, 3, 12, 7, 4, 11, 6])
  packed = data_lib.pack(data, 16, pad_id=PAD)
  assert packed["tokens"].shape[1] == 16
  seqs = []
  for r in range(packed["tokens"].shape[0]):
    for s in range(1, packed["segment_ids"][r].max() + 1):
      where = packed["segment_ids"][r] == s
      assert np.all(np.diff(np.nonzero(where)[0]) == 1)  # contiguous
      np.testing.assert_array_equal(packed["positions"][r][where], np.arange(where.sum()))
      seqs.append(tuple(packed["tokens"][r][where].tolist()))
  lengths = data["prompt_len"] + data["answer_len"]
  want = sorted(tuple(data["tokens"][i, :lengths[i]].tolist()) for i in range(len(lengths)))
  assert sorted(seqs) == want
  assert data_lib.real_tokens(packed) == data_lib.real_tokens(data) == int(lengths.sum())
  # Best fit fills rows: 65 tokens (with EOS) in 5 rows of 16, the fewest possible.
  assert packed["tokens"].shape[0] == 5


def test_pack_refuses_bad_input():
  data = _dataset([5, 20])
  with pytest.raises(ValueError, match="row_len=16"):
    data_lib.pack(data, 16, pad_id=PAD)
  with pytest.raises(ValueError, match="row_len"):
    data_lib.pack(data, 1, pad_id=PAD)
  with pytest.raises(ValueError, match="loss_on"):
    data_lib.pack(data, 32, pad_id=PAD, loss_on="prompt")


def _trained(weights_row, tokens_row):
  return [int(t) for w, t in zip(weights_row, tokens_row) if w]


@pytest.mark.parametrize("loss_on", ["all", "answer"])
def test_untrained_tail_leaves_the_last_tokens_out_packed_or_not(loss_on):
  data = data_lib.encode([([4, 5], [6, 7, 8]), ([9], [10]), ([11, 12], [13, 14])],
                         eos_id=EOS, pad_id=PAD)
  marked = data_lib.untrain_tail(data, [2, 1, 0])
  # Trained targets per sequence (the first token is never a target).
  first = {"all": [[5, 6, 7, 8, EOS], [10, EOS], [12, 13, 14, EOS]],
           "answer": [[6, 7, 8, EOS], [10, EOS], [13, 14, EOS]]}[loss_on]
  want = [first[0][:-2], first[1][:-1], first[2]]
  b = data_lib.lm_batch(marked, loss_on=loss_on)
  assert [_trained(w, t) for w, t in zip(b["weights"], b["targets"])] == want
  plain = data_lib.lm_batch(data, loss_on=loss_on)
  assert [_trained(w, t) for w, t in zip(plain["weights"], plain["targets"])] == first
  # Packed with an unmarked dataset: the marks follow their rows, the others train whole.
  packed = data_lib.pack(data_lib.concat([marked, data], PAD), 32, pad_id=PAD, loss_on=loss_on)
  pb = data_lib.lm_batch(packed)
  got = [t for w, t in zip(pb["weights"][0], pb["targets"][0]) if w]
  assert sorted(got) == sorted(sum(want, []) + sum(first, []))
  assert data_lib.take(marked, np.array([2, 0]))["untrained_tail"].tolist() == [0, 2]


def test_untrained_tail_refuses_counts_that_leave_nothing_trained():
  data = data_lib.encode([([4], [6, 7])], eos_id=EOS, pad_id=PAD)
  for bad in (3, -1):
    with pytest.raises(ValueError, match="untrain_tail"):
      data_lib.untrain_tail(data, bad)


@pytest.mark.parametrize("loss_on", ["all", "answer"])
def test_packed_logits_and_loss_equal_one_by_one(loss_on):
  cfg = transformer.ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                max_len=64)
  params = transformer.init(jax.random.key(0), cfg)
  adapter = lora_lib.init(jax.random.key(1), params, lora_lib.LoraConfig(rank=2))
  adapter = jax.tree.map(lambda x: x + 0.05, adapter)  # non-zero b: the LoRA path matters
  mix = lora_lib.LoraMix.single(adapter)
  data = _dataset([5, 9, 3, 12, 7, 4, 11, 6], seed=3)
  packed = data_lib.pack(data, 24, pad_id=PAD, loss_on=loss_on)
  batch = data_lib.lm_batch(packed, loss_on)
  packed_fn = jax.jit(lambda tokens, pos, seg: transformer.apply(
      params, cfg, tokens, lora=mix, positions_BxT=pos, segment_ids_BxT=seg))
  logits = packed_fn(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                     jnp.asarray(batch["segment_ids"]))
  # Each sequence alone, right-padded to one length (causal: padding never reaches it).
  alone_fn = jax.jit(lambda tokens: transformer.apply(params, cfg, tokens, lora=mix))
  width = batch["inputs"].shape[1]
  for r in range(packed["tokens"].shape[0]):
    for s in range(1, packed["segment_ids"][r].max() + 1):
      where = np.nonzero(packed["segment_ids"][r] == s)[0]
      seq = np.full((1, width), PAD, np.int32)
      seq[0, :len(where) - 1] = packed["tokens"][r, where[:-1]]
      alone = alone_fn(jnp.asarray(seq))[0, :len(where) - 1]
      got = logits[r, where[:-1]]
      np.testing.assert_allclose(np.asarray(got), np.asarray(alone), atol=1e-5, rtol=1e-5)
  # The packed loss is the unpacked loss: same weighted positions, same values.
  unpacked = data_lib.lm_batch(data, loss_on)
  logits_u = alone_fn(jnp.asarray(unpacked["inputs"]))
  loss_u = metrics_lib.batch_metrics(logits_u, jnp.asarray(unpacked["targets"]),
                                     jnp.asarray(unpacked["weights"]))["loss"]
  loss_p = metrics_lib.batch_metrics(logits, jnp.asarray(batch["targets"]),
                                     jnp.asarray(batch["weights"]))["loss"]
  assert float(batch["weights"].sum()) == float(unpacked["weights"].sum())
  np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)


def test_pretrain_on_packed_rows_learns():
  cfg = transformer.ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                                max_len=64)
  data = _dataset([6] * 64, seed=5)
  packed = data_lib.pack(data, 24, pad_id=PAD)
  loop = train_lib.LoopConfig(steps=40, batch_size=8, loss_on="all")
  _, history = train_lib.pretrain(cfg, packed, optim=train_lib.OptimConfig(learning_rate=1e-2),
                                  loop=loop)
  assert history[-1]["loss"] < history[0]["loss"] - 0.5
