"""Token arrays for training and evaluation, and stateless batching.

An encoded dataset is a dict of NumPy arrays with N rows, right-padded to length T:
  tokens      [N, T] int32   prompt tokens, then answer tokens, then EOS, then pad
  prompt_len  [N]    int32   number of prompt tokens
  answer_len  [N]    int32   number of answer tokens *including* the final EOS
Right padding needs no attention mask: attention is causal, so the pad after a sequence never
reaches its positions.

`lm_batch` turns rows into (inputs, targets, weights) for next-token training, weighting
either every real token (pretraining) or only the answer span (question answering).
Batches are a pure function of (seed, step) — `batch_indices` — so the data-iterator
position is the step, and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Encoded = dict[str, np.ndarray]
_LOSS_ON = ("all", "answer")


def encode(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, eos_id: int, pad_id: int,
           max_len: int | None = None) -> Encoded:
  """(prompt ids, answer ids) pairs → an encoded dataset (EOS appended to each answer)."""
  if not pairs:
    raise ValueError("encode got no examples")
  lengths = [len(p) + len(a) + 1 for p, a in pairs]
  t = max(lengths) if max_len is None else max_len
  if max(lengths) > t:
    worst = int(np.argmax(lengths))
    raise ValueError(f"example {worst} has {lengths[worst]} tokens, more than max_len={t}")
  tokens = np.full((len(pairs), t), pad_id, np.int32)
  prompt_len = np.zeros(len(pairs), np.int32)
  answer_len = np.zeros(len(pairs), np.int32)
  for i, (p, a) in enumerate(pairs):
    if len(p) == 0:
      raise ValueError(f"example {i} has an empty prompt")
    row = list(p) + list(a) + [eos_id]
    tokens[i, :len(row)] = row
    prompt_len[i] = len(p)
    answer_len[i] = len(a) + 1
  return {"tokens": tokens, "prompt_len": prompt_len, "answer_len": answer_len}


def concat(datasets: Sequence[Encoded], pad_id: int) -> Encoded:
  """Rows of several encoded datasets in one (padded to the longest)."""
  if not datasets:
    raise ValueError("concat got no datasets")
  t = max(d["tokens"].shape[1] for d in datasets)
  tokens = np.concatenate(
      [np.pad(d["tokens"], ((0, 0), (0, t - d["tokens"].shape[1])), constant_values=pad_id)
       for d in datasets])
  return {"tokens": tokens,
          "prompt_len": np.concatenate([d["prompt_len"] for d in datasets]),
          "answer_len": np.concatenate([d["answer_len"] for d in datasets])}


def take(data: Encoded, idx: np.ndarray) -> Encoded:
  return {k: v[idx] for k, v in data.items()}


def size(data: Encoded) -> int:
  return int(data["tokens"].shape[0])


def lm_batch(rows: Mapping[str, np.ndarray], loss_on: str = "answer") -> dict[str, np.ndarray]:
  """inputs/targets [B, T-1] and float weights marking the trained target positions.

  loss_on='all': every token of prompt and answer (pretraining on text);
  loss_on='answer': only the answer tokens and EOS (question answering).
  """
  if loss_on not in _LOSS_ON:
    raise ValueError(f"loss_on={loss_on!r} is not one of {list(_LOSS_ON)}")
  tokens = rows["tokens"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  pos = np.arange(targets.shape[1])[None, :] + 1  # position of each target in `tokens`
  end = (rows["prompt_len"] + rows["answer_len"])[:, None]
  start = np.ones_like(end) if loss_on == "all" else rows["prompt_len"][:, None]
  weights = ((pos >= start) & (pos < end)).astype(np.float32)
  return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
          "weights": weights}


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Rows of batch `step`: epochs are fresh permutations of range(n), keyed by (seed, epoch).

  Stateless: the iterator position is `step` itself. Batches wrap across epoch boundaries.
  """
  if n <= 0 or batch_size <= 0:
    raise ValueError(f"batch_indices needs n > 0 and batch_size > 0, got n={n}, "
                     f"batch_size={batch_size}")
  start = step * batch_size
  out = np.empty(batch_size, np.int64)
  filled = 0
  while filled < batch_size:
    epoch, offset = divmod(start + filled, n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    take_n = min(batch_size - filled, n - offset)
    out[filled:filled + take_n] = perm[offset:offset + take_n]
    filled += take_n
  return out


def batch_at(data: Encoded, batch_size: int, seed: int, step: int,
             loss_on: str = "answer") -> dict[str, np.ndarray]:
  return lm_batch(take(data, batch_indices(size(data), batch_size, seed, step)), loss_on)
