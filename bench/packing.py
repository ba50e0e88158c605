"""Packed vs padded pretraining on the default study's world: real tokens per second.

The world and base model of `configs/two_hop.py` (seed 0), one full train step compiled per
layout, the same optimizer. Padded: `padded_batch` corpus texts per row-batch, each padded
to the corpus's longest text (the study with `pretrain.row_len = 0`). Packed: `packed_batch`
rows of `row_len` tokens filled by `data.pack` (the study's default). Each side runs `steps`
steps `repeats` times on one fixed batch of its layout (the step's cost does not depend on
the tokens); the best repeat gives its rate in *real* (non-pad) tokens per second, the
quantity that decides how much pretraining text a time budget buys. The ratio packed /
padded is the performance issue's target (≥ 2.5×).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from bench import training
from lora_limits import data as data_lib
from lora_limits import tokenizer as tok_lib
from lora_limits.models import transformer


@dataclasses.dataclass(frozen=True)
class PackingSizes:
  """world_overrides / model_overrides: fields of the study's `world` / `model` sections
  replaced (tiny mode only)."""

  padded_batch: int = 64
  packed_batch: int = 16
  row_len: int = 128
  steps: int = 10
  repeats: int = 3
  world_overrides: tuple[tuple[str, Any], ...] = ()
  model_overrides: tuple[tuple[str, Any], ...] = ()
  seed: int = 0

  def __post_init__(self):
    for name in ("padded_batch", "packed_batch", "row_len", "steps", "repeats"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"PackingSizes.{name} must be a positive int, got {v!r}")


def _study_world(sizes: PackingSizes):
  """(world, tokenizer, model config) of the default study, seed `sizes.seed`."""
  from configs import two_hop  # bench may read configs; the library never does
  from experiments.studies import recycling
  from experiments.studies.recycling import config as config_lib
  c = two_hop.get_config()
  c.world.update(dict(sizes.world_overrides))
  c.model.update(dict(sizes.model_overrides))
  cfg = recycling.parse(c)
  tokenizer = tok_lib.build([" ".join(config_lib.vocabulary(cfg))])
  world = config_lib.build_world(cfg, sizes.seed)
  return world, tokenizer, cfg.model.model_config(len(tokenizer))


def _time(trainer: training.OurTrainer, steps: int, repeats: int) -> float:
  trainer.steps(1)  # warm: the first call after compiling
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    trainer.steps(steps)
    best = min(best, time.perf_counter() - start)
  return best / steps


def run(sizes: PackingSizes, log=print, quiet=None) -> dict[str, Any]:
  del quiet  # two short timings side by side; the harness waits for quiet before the part
  world, tokenizer, cfg = _study_world(sizes)
  rows = tok_lib.encode_corpus(tokenizer, world.corpus)
  packed = data_lib.pack(rows, sizes.row_len, pad_id=tokenizer.pad_token_id)
  params = transformer.init(jax.random.key(sizes.seed), cfg)
  out: dict[str, Any] = {
      "model": cfg.to_dict(), "corpus_texts": data_lib.size(rows),
      "corpus_real_tokens": data_lib.real_tokens(rows),
      "padded_width": int(rows["tokens"].shape[1]),
      "padded_real_fraction": data_lib.real_tokens(rows) / rows["tokens"].size,
      "packed_rows": data_lib.size(packed),
      "packed_real_fraction": data_lib.real_tokens(packed) / packed["tokens"].size}
  for name, data, batch_size in (("padded", rows, sizes.padded_batch),
                                 ("packed", packed, sizes.packed_batch)):
    idx = data_lib.batch_indices(data_lib.size(data), batch_size, sizes.seed, 0)
    chosen = data_lib.take(data, idx)
    batch = data_lib.lm_batch(chosen, loss_on="all")
    trainer = training.OurTrainer(params, cfg, None, batch, "full", sizes.seed)
    seconds = _time(trainer, sizes.steps, sizes.repeats)
    real = data_lib.real_tokens(chosen)
    out[name] = {"batch_rows": batch_size, "tokens_per_step": int(chosen["tokens"].size),
                 "real_tokens_per_step": real, "seconds_per_step": seconds,
                 "real_tokens_per_s": real / seconds, "compile_s": trainer.compile_s}
    log(f"packing: {name} {real} real of {chosen['tokens'].size} tokens per step, "
        f"{seconds * 1e3:.1f} ms/step, {real / seconds:,.0f} real tokens/s")
  out["ratio"] = out["packed"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"]
  return out
