"""Teacher-forced metrics of a language model's logits, written once.

Every caller scores next-token logits against `targets` [B, T] at the positions `weights`
[B, T] selects (`data.lm_batch`: all tokens for pretraining, the answer and EOS for
questions). A row is *exact* when the argmax is the target at every weighted position —
which holds iff greedy decoding reproduces the reference exactly. Rows without a weighted
position never count as exact and are left out of the exact-match mean.

- `batch_metrics`: the batch means {'loss', 'token_accuracy', 'exact_match'} (training and
  the many-combination scorer).
- `row_metrics`: per row {'exact', 'loss', 'tokens'} (the one-model evaluator).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BATCH_METRICS = ("loss", "exact_match", "token_accuracy")


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """[B, T]: −log p(target) under the logits (computed in float32)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


def argmax_hits(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """[B, T] bool: the argmax is the target."""
  return jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT


def _exact_rows(hits_BxT: jax.Array, weights_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(row exact [B] bool, row has a weighted position [B] bool)."""
  has = weights_BxT.sum(axis=-1) > 0
  return jnp.all(hits_BxT | (weights_BxT == 0), axis=-1) & has, has


def batch_metrics(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                  weights_BxT: jax.Array) -> dict[str, jax.Array]:
  """Scalars over the batch: weighted mean NLL ('loss'), weighted token accuracy, and the
  fraction of rows (with a weighted position) that are exact."""
  nll = token_nll(logits_BxTxV, targets_BxT)
  w = weights_BxT.astype(jnp.float32)
  total = jnp.maximum(w.sum(), 1.0)
  hits = argmax_hits(logits_BxTxV, targets_BxT)
  exact, has = _exact_rows(hits, w)
  return {"loss": (nll * w).sum() / total,
          "token_accuracy": (hits * w).sum() / total,
          "exact_match": exact.sum() / jnp.maximum(has.sum(), 1)}


def row_metrics(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                weights_BxT: jax.Array) -> dict[str, jax.Array]:
  """Per row: 'exact' [B] bool, 'loss' [B] (mean NLL over its weighted positions) and
  'tokens' [B] (its weight total)."""
  nll = token_nll(logits_BxTxV, targets_BxT)
  exact, _ = _exact_rows(argmax_hits(logits_BxTxV, targets_BxT), weights_BxT)
  count = jnp.sum(weights_BxT, axis=-1)
  return {"exact": exact,
          "loss": jnp.sum(nll * weights_BxT, axis=-1) / jnp.maximum(count, 1.0),
          "tokens": count}
