"""Exact-match evaluation: batched greedy decoding in one jitted call, and teacher forcing.

Greedy decoding: prompts are right-padded and each row has its own cursor; the model is
causal with no padding mask, so token t of row i is the argmax of the logits at position
prompt_len_i + t − 1, and whatever sits to the right of the cursor never matters. Each step
recomputes the full (short) sequence inside a `lax.while_loop` that stops once every row
has emitted EOS, so a whole batch decodes in one compiled call. Rows are chunked into
fixed-size batches (the last one padded) and lengths rounded up to buckets, so splits of
any size reuse one compilation. `lora=` takes any `LoraMix` (one adapter, fixed mixing
weights, or a router), passed to the jitted functions as the pytree it is.

Scoring (`score`): a direct answer is right iff the normalised generation equals the
answer. A chain-of-thought answer is right iff the generation ends with the final answer
preceded by the same word as in the reference (its anchor: "… lives in C"); its bridge is
right iff the step (sentence) that states each bridge ends, as in the reference, with the
anchor and the bridge ("A 's spouse is B ."), so a mis-copied subject does not count
against the bridge. A generation without EOS within the budget is wrong.

Teacher forcing (`teacher_forced`, with `metrics.row_metrics`): one forward pass; a row is exact
iff the argmax at every answer position (answer tokens and EOS) equals the reference —
which holds iff greedy decoding reproduces the reference answer exactly. For direct
answers that is the greedy exact match; for CoT answers it is the stricter full-chain match.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_limits import data as data_lib
from lora_limits import lora as lora_lib
from lora_limits import metrics as metrics_lib
from lora_limits import tokenizer as tokenizer_lib
from lora_limits.models import transformer
from lora_limits.tasks import common

_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class SplitResult:
  """Accuracy on one split, with the chance level of its answer space.

  correct / bridge_correct: per-example outcomes (for intervals and paired comparisons).
  bridge_accuracy: for chain-of-thought splits, how often every bridge entity was right.
  strict_accuracy: for chain-of-thought splits, how often both the bridges and the final
    answer were right (`accuracy` is then the lenient, final-answer-only score).
  """

  split: str
  accuracy: float
  n: int
  chance: float
  bridge_accuracy: float | None = None
  correct: tuple[bool, ...] = ()
  bridge_correct: tuple[bool, ...] | None = None
  strict_accuracy: float | None = None

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["correct"] = [int(c) for c in self.correct]
    if self.bridge_correct is not None:
      out["bridge_correct"] = [int(c) for c in self.bridge_correct]
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SplitResult":
    d = dict(d)
    d["correct"] = tuple(bool(c) for c in d.get("correct", ()))
    if d.get("bridge_correct") is not None:
      d["bridge_correct"] = tuple(bool(c) for c in d["bridge_correct"])
    return cls(**d)


def score(generated: str | None, example: common.Example) -> tuple[bool, bool | None]:
  """(answer right, bridge right or None) for one generation; None means no EOS came."""
  meta = example.meta
  has_bridge = "bridge_steps" in meta
  if generated is None:
    return False, (False if has_bridge else None)
  gen = common.normalise(generated).split()
  ref = common.normalise(example.answer).split()
  if meta.get("format", "direct") == "cot":
    m = min(len(common.normalise(meta["final"]).split()) + 1, len(ref))
    correct = len(gen) >= m and gen[-m:] == ref[-m:]
  else:
    correct = gen == ref
  bridge = None
  if has_bridge:
    gen_steps, ref_steps = _steps(gen), _steps(ref)
    bridge = True
    for b, j in zip(meta["bridges"], meta["bridge_steps"]):
      if j >= len(gen_steps) or j >= len(ref_steps):
        bridge = False
        break
      g, r, n = gen_steps[j], ref_steps[j], len(b.split())
      k = min(n + 1, len(r))  # the bridge and the word before it (its anchor)
      bridge = bridge and len(g) >= k and g[-k:] == r[-k:] and (k > n or g == r)
  return bool(correct), bridge


def _steps(words: list[str]) -> list[list[str]]:
  """Words split into chain-of-thought steps at '.'."""
  out: list[list[str]] = [[]]
  for w in words:
    if w == common.STEP_SEPARATOR:
      out.append([])
    else:
      out[-1].append(w)
  return out


# ----------------------------------------------------------------------- decoding


def _check_mix(lora: lora_lib.LoraMix | None) -> None:
  if lora is None:
    return
  if not isinstance(lora, lora_lib.LoraMix):
    raise ValueError(f"lora must be a LoraMix (or None), got {type(lora).__name__}")
  if lora.weights is not None and jnp.ndim(lora.weights) == 3:
    raise ValueError("per-token LoraMix.weights [B, T, K] cannot be used for decoding (the "
                     "sequence grows); use [K] or [B, K] weights or a router")


def _chunk_mix(lora: lora_lib.LoraMix | None, lo: int, hi: int, n: int, batch_size: int):
  """The mix for rows [lo, hi): per-row weights [N, K] are sliced and padded."""
  if lora is None or lora.weights is None or jnp.ndim(lora.weights) != 2:
    return lora
  if lora.weights.shape[0] != n:
    raise ValueError(f"LoraMix.weights has {lora.weights.shape[0]} rows, the data has {n}")
  w = jnp.asarray(lora.weights)[lo:hi]
  w = jnp.concatenate([w, jnp.repeat(w[:1], batch_size - (hi - lo), axis=0)])
  return dataclasses.replace(lora, weights=w)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "eos_id", "pad_id"))
def _decode_batch(params, tokens_BxL, prompt_len_B, lora, *, cfg, max_new, eos_id, pad_id):
  b = tokens_BxL.shape[0]
  rows = jnp.arange(b)

  def cond(state):
    t, _, done, _ = state
    return (t < max_new) & ~jnp.all(done)

  def body(state):
    t, tokens, done, out = state
    logits_BxLxV = transformer.apply(params, cfg, tokens, lora=lora)
    next_B = jnp.argmax(logits_BxLxV[rows, prompt_len_B + t - 1], axis=-1).astype(jnp.int32)
    next_B = jnp.where(done, pad_id, next_B)
    tokens = tokens.at[rows, prompt_len_B + t].set(next_B)
    out = out.at[:, t].set(next_B)
    return t + 1, tokens, done | (next_B == eos_id), out

  out0 = jnp.full((b, max_new), pad_id, jnp.int32)
  state = (jnp.int32(0), tokens_BxL, jnp.zeros((b,), bool), out0)
  return jax.lax.while_loop(cond, body, state)[3]


def greedy_decode(params, cfg: transformer.ModelConfig, data: data_lib.Encoded, *,
                  max_new_tokens: int, eos_id: int, pad_id: int,
                  lora: lora_lib.LoraMix | None = None, batch_size: int = 64) -> np.ndarray:
  """Generated ids [N, max_new_tokens] for the prompts of `data` (pad after each EOS).

  Only `tokens[:, :prompt_len]` of each row is read; answers in `data` are ignored.
  """
  n = data_lib.size(data) if "tokens" in data else 0
  if n == 0:
    raise ValueError("greedy_decode got no rows")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  prompt_len = np.asarray(data["prompt_len"], np.int32)
  if prompt_len.min() < 1:
    raise ValueError("every row needs a prompt of at least one token")
  max_prompt = int(prompt_len.max())
  length = _round_up(max_prompt + max_new_tokens, _BUCKET)
  if cfg.pos == "learned" and length > cfg.max_len:
    raise ValueError(f"prompts of {max_prompt} tokens plus {max_new_tokens} new tokens exceed "
                     f"ModelConfig.max_len={cfg.max_len}")
  tokens = np.full((n, length), pad_id, np.int32)
  src = np.asarray(data["tokens"])[:, :max_prompt]
  keep = np.arange(max_prompt)[None, :] < prompt_len[:, None]
  tokens[:, :max_prompt] = np.where(keep, src, pad_id)
  _check_mix(lora)
  outs = []
  for lo in range(0, n, batch_size):
    hi = min(lo + batch_size, n)
    idx = np.concatenate([np.arange(lo, hi), np.full(batch_size - (hi - lo), lo)])
    outs.append(_decode_batch(
        params, jnp.asarray(tokens[idx]), jnp.asarray(prompt_len[idx]),
        _chunk_mix(lora, lo, hi, n, batch_size), cfg=cfg, max_new=max_new_tokens, eos_id=int(eos_id), pad_id=int(pad_id)))
  return np.concatenate([np.asarray(o) for o in outs])[:n]


def generate(params, cfg: transformer.ModelConfig, tokenizer, examples: Sequence[common.Example],
             *, lora: lora_lib.LoraMix | None = None, max_new_tokens: int | None = None,
             batch_size: int = 64, slack: int = 4) -> list[str | None]:
  """Greedy answers as text (None where no EOS came within the budget).

  The budget defaults to the longest reference answer (with EOS) plus `slack`, rounded up
  to a bucket so splits share compilations.
  """
  if not examples:
    raise ValueError("generate got no examples")
  data = tokenizer_lib.encode_examples(tokenizer, examples)
  if max_new_tokens is None:
    max_new_tokens = _round_up(int(data["answer_len"].max()) + slack, _BUCKET)
  ids = greedy_decode(params, cfg, data, max_new_tokens=max_new_tokens,
                      eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, lora=lora,
                      batch_size=batch_size)
  eos = tokenizer.eos_token_id
  return [tokenizer_lib.decode(tokenizer, row) if eos in row else None for row in ids.tolist()]


def evaluate_split(params, cfg: transformer.ModelConfig, tokenizer,
                   examples: Sequence[common.Example], *, split: str,
                   chance: float | None = None, lora: lora_lib.LoraMix | None = None,
                   max_new_tokens: int | None = None, batch_size: int = 64) -> SplitResult:
  """Greedy exact match on one split. chance: from the world (`World.chance`); None falls
  back to the split's own answer space."""
  if not examples:
    raise ValueError(f"split {split!r} is empty")
  texts = generate(params, cfg, tokenizer, examples, lora=lora, max_new_tokens=max_new_tokens,
                   batch_size=batch_size)
  return score_split(split, texts, examples, chance)


def score_split(split: str, texts: Sequence[str | None], examples: Sequence[common.Example],
                chance: float | None = None) -> SplitResult:
  """A SplitResult from generations (see `score`)."""
  if len(texts) != len(examples) or not examples:
    raise ValueError(f"split {split!r}: {len(texts)} generations for {len(examples)} examples")
  scored = [score(t, e) for t, e in zip(texts, examples)]
  correct = tuple(c for c, _ in scored)
  bridges = [b for _, b in scored]
  bridge_correct = tuple(bridges) if all(b is not None for b in bridges) else None
  if chance is None:
    chance = common.chance_levels({split: tuple(examples)})[split]
  strict = None
  if bridge_correct is not None:
    strict = float(np.mean([c and b for c, b in zip(correct, bridge_correct)]))
  return SplitResult(
      split=split, accuracy=float(np.mean(correct)), n=len(examples), chance=float(chance),
      bridge_accuracy=None if bridge_correct is None else float(np.mean(bridge_correct)),
      correct=correct, bridge_correct=bridge_correct, strict_accuracy=strict)


# ----------------------------------------------------------------- teacher forcing


@functools.partial(jax.jit, static_argnames=("cfg",))
def _teacher_forced_batch(params, batch, lora, *, cfg):
  logits = transformer.apply(params, cfg, batch["inputs"], lora=lora)
  return metrics_lib.row_metrics(logits, batch["targets"], batch["weights"])


def teacher_forced(params, cfg: transformer.ModelConfig, data: data_lib.Encoded, *,
                   lora: lora_lib.LoraMix | None = None, batch_size: int = 64,
                   pad_id: int = 0) -> dict[str, np.ndarray]:
  """Per row: exact [N] bool, loss [N] (mean answer NLL), tokens [N] — one forward per chunk."""
  n = data_lib.size(data) if "tokens" in data else 0
  if n == 0:
    raise ValueError("teacher_forced got no rows")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  t = _round_up(int(np.asarray(data["tokens"]).shape[1]), _BUCKET)
  tokens = np.full((n, t), pad_id, np.int32)
  tokens[:, :data["tokens"].shape[1]] = data["tokens"]
  padded = {"tokens": tokens, "prompt_len": np.asarray(data["prompt_len"]),
            "answer_len": np.asarray(data["answer_len"])}
  if "untrained_tail" in data:  # rows whose last tokens are not targets: exact without them
    padded["untrained_tail"] = np.asarray(data["untrained_tail"])
  _check_mix(lora)
  outs = []
  for lo in range(0, n, batch_size):
    hi = min(lo + batch_size, n)
    idx = np.concatenate([np.arange(lo, hi), np.full(batch_size - (hi - lo), lo)])
    batch = data_lib.lm_batch(data_lib.take(padded, idx), loss_on="answer")
    outs.append(_teacher_forced_batch(
        params, {k: jnp.asarray(v) for k, v in batch.items()},
        _chunk_mix(lora, lo, hi, n, batch_size), cfg=cfg))
  return {k: np.concatenate([np.asarray(o[k]) for o in outs])[:n] for k in outs[0]}
