"""Token arrays for training and evaluation, and stateless batching.

An encoded dataset is a dict of NumPy arrays with N rows, right-padded to length T:
  tokens      [N, T] int32   prompt tokens, then answer tokens, then EOS, then pad
  prompt_len  [N]    int32   number of prompt tokens
  answer_len  [N]    int32   number of answer tokens *including* the final EOS
  untrained_tail [N] int32  optional (`untrain_tail`): closing tokens left out of the loss
Right padding needs no attention mask: attention is causal, so the pad after a sequence never
reaches its positions.

`lm_batch` turns rows into (inputs, targets, weights) for next-token training, weighting
either every real token (pretraining) or only the answer span (question answering).
Batches are a pure function of (seed, step) — `batch_indices` — so the data-iterator
position is the step, and a resumed run sees exactly the batches it would have seen.
`pack` puts several sequences into each row (with segment ids and per-segment positions), so
pretraining computes no padding.
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


def untrain_tail(data: Encoded, count: int | Sequence[int] | np.ndarray = 1) -> Encoded:
  """The same rows with their last `count` tokens (per row, or one count for all; 1 is the
  closing EOS) left out of the loss; the tokens stay in the sequence. For data whose end is
  not a place to stop: a fact stated in running text ("A lives in" → "B ." — trained
  without its period and EOS, it teaches the fact and leaves what follows to the model)."""
  counts = np.broadcast_to(np.asarray(count, np.int32), (size(data),)).copy()
  if (counts < 0).any() or (counts >= data["answer_len"]).any():
    raise ValueError("untrain_tail: each count must be >= 0 and leave at least one answer "
                     "token trained")
  return dict(data, untrained_tail=counts)


def _untrained_tail(data: Encoded) -> np.ndarray:
  """[N] int32: closing tokens of each row that are not trained targets (default 0)."""
  return data.get("untrained_tail", np.zeros(size(data), np.int32))


def concat(datasets: Sequence[Encoded], pad_id: int) -> Encoded:
  """Rows of several encoded datasets in one (padded to the longest)."""
  if not datasets:
    raise ValueError("concat got no datasets")
  t = max(d["tokens"].shape[1] for d in datasets)
  tokens = np.concatenate(
      [np.pad(d["tokens"], ((0, 0), (0, t - d["tokens"].shape[1])), constant_values=pad_id)
       for d in datasets])
  out = {"tokens": tokens,
         "prompt_len": np.concatenate([d["prompt_len"] for d in datasets]),
         "answer_len": np.concatenate([d["answer_len"] for d in datasets])}
  if any("untrained_tail" in d for d in datasets):
    out["untrained_tail"] = np.concatenate([_untrained_tail(d) for d in datasets])
  return out


def take(data: Encoded, idx: np.ndarray) -> Encoded:
  return {k: v[idx] for k, v in data.items()}


def size(data: Encoded) -> int:
  return int(data["tokens"].shape[0])


def pack(data: Encoded, row_len: int, *, pad_id: int, loss_on: str = "all") -> Encoded:
  """Sequences of an encoded dataset packed into rows of exactly `row_len` tokens.

  Each sequence (its prompt, answer and EOS) goes whole into one row, best fit: the row with
  the least room that still holds it, else a new row; deterministic in the input order.
  Returns a *packed* dataset:
    tokens       [M, L] int32   the sequences side by side, then pad
    segment_ids  [M, L] int32   1, 2, ... per sequence within its row; 0 on padding
    positions    [M, L] int32   position within the sequence (restarts at 0 per segment)
    loss_mask    [M, L] float32 1 where the token is a trained target (`loss_on`, as lm_batch)
  A model that attends only within a segment (`transformer.apply(..., segment_ids_BxT=)`)
  gives every packed sequence exactly the logits it has alone; `lm_batch` of packed rows
  never trains a prediction across a segment boundary.
  """
  if loss_on not in _LOSS_ON:
    raise ValueError(f"loss_on={loss_on!r} is not one of {list(_LOSS_ON)}")
  if isinstance(row_len, bool) or not isinstance(row_len, int) or row_len < 2:
    raise ValueError(f"row_len must be an int >= 2, got {row_len!r}")
  lengths = (data["prompt_len"] + data["answer_len"]).astype(np.int64)
  n = size(data)
  if n == 0:
    raise ValueError("pack got no rows")
  if lengths.max() > row_len:
    worst = int(np.argmax(lengths))
    raise ValueError(f"sequence {worst} has {int(lengths[worst])} tokens, more than "
                     f"row_len={row_len}")
  # by_room[c]: rows with exactly c free tokens (best fit scans c upwards from the length).
  by_room: list[list[int]] = [[] for _ in range(row_len + 1)]
  rows: list[list[int]] = []
  fill: list[int] = []
  for i, length in enumerate(lengths.tolist()):
    row = None
    for room in range(length, row_len + 1):
      if by_room[room]:
        row = by_room[room].pop()
        break
    if row is None:
      row = len(rows)
      rows.append([])
      fill.append(0)
    rows[row].append(i)
    fill[row] += length
    by_room[row_len - fill[row]].append(row)
  m = len(rows)
  tail = _untrained_tail(data)
  tokens = np.full((m, row_len), pad_id, np.int32)
  segments = np.zeros((m, row_len), np.int32)
  positions = np.zeros((m, row_len), np.int32)
  loss_mask = np.zeros((m, row_len), np.float32)
  for r, members in enumerate(rows):
    start = 0
    for seg, i in enumerate(members, start=1):
      length = int(lengths[i])
      span = slice(start, start + length)
      tokens[r, span] = data["tokens"][i, :length]
      segments[r, span] = seg
      offsets = np.arange(length)
      positions[r, span] = offsets
      first = 1 if loss_on == "all" else int(data["prompt_len"][i])
      loss_mask[r, span] = ((offsets >= first) & (offsets < length - tail[i])).astype(np.float32)
      start += length
  return {"tokens": tokens, "segment_ids": segments, "positions": positions,
          "loss_mask": loss_mask}


def is_packed(data: Mapping[str, np.ndarray]) -> bool:
  return "segment_ids" in data


def real_tokens(data: Encoded) -> int:
  """Tokens that are part of a sequence (not padding), packed or not."""
  if is_packed(data):
    return int((data["segment_ids"] > 0).sum())
  return int((data["prompt_len"] + data["answer_len"]).sum())


def lm_batch(rows: Mapping[str, np.ndarray], loss_on: str = "answer") -> dict[str, np.ndarray]:
  """inputs/targets [B, T-1] and float weights marking the trained target positions.

  loss_on='all': every token of prompt and answer (pretraining on text);
  loss_on='answer': only the answer tokens and EOS (question answering).
  Rows marked by `untrain_tail` leave their last tokens out of the loss either way.
  Packed rows (`pack`) carry their own loss mask (`loss_on` was chosen when packing) and add
  `positions` and `segment_ids` [B, T-1] for the model.
  """
  if loss_on not in _LOSS_ON:
    raise ValueError(f"loss_on={loss_on!r} is not one of {list(_LOSS_ON)}")
  if is_packed(rows):
    tokens = rows["tokens"]
    return {"inputs": tokens[:, :-1].astype(np.int32),
            "targets": tokens[:, 1:].astype(np.int32),
            "weights": rows["loss_mask"][:, 1:].astype(np.float32),
            "positions": rows["positions"][:, :-1].astype(np.int32),
            "segment_ids": rows["segment_ids"][:, :-1].astype(np.int32)}
  tokens = rows["tokens"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  pos = np.arange(targets.shape[1])[None, :] + 1  # position of each target in `tokens`
  end = (rows["prompt_len"] + rows["answer_len"])[:, None]
  start = np.ones_like(end) if loss_on == "all" else rows["prompt_len"][:, None]
  weights = ((pos >= start) & (pos < end)).astype(np.float32)
  weights *= (pos < end - _untrained_tail(rows)[:, None]).astype(np.float32)
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
