"""Cached stages: the base model pretrained on a world, and one trained adapter per split.

Completed stages are never recomputed: each lives in the cache under a hash of everything it
depends on (world content, model, schedule, adapter settings, seed), resumes from its orbax
checkpoints if it was interrupted, and writes its info JSON only once it is done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import common
from experiments import distributed
from experiments import schema
from experiments.studies.recycling import config as config_lib
from lora_limits import data as data_lib
from lora_limits import exact_match
from lora_limits import lora as lora_lib
from lora_limits import tokenizer as tok_lib
from lora_limits import train as train_lib
from lora_limits.models import transformer
from lora_limits.tasks import common as task_common

RecyclingStudy = config_lib.RecyclingStudy


# ------------------------------------------------------------------------------ caching


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Base:
  cfg: transformer.ModelConfig
  params: Any
  tokenizer: Any
  key: str
  info: dict


def _progress(directory: pathlib.Path, label: str, total: int):
  """A progress line per training run, and `metrics.live.jsonl` to watch while it trains.

  The live file is appended to step by step (a resumed run appends the redone steps again);
  `metrics.jsonl` is written whole at the end from the history, which a resumed run
  restores from its checkpoint, and the live file is then removed.
  """
  progress = common.Progress(label, total, every=2.0)
  live = directory / "metrics.live.jsonl"

  def on_metrics(step: int, metrics: Mapping[str, float]) -> None:
    if common.is_writer():
      with open(live, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(metrics, step=step), sort_keys=True) + "\n")
    progress.update(step, f"loss {metrics['loss']:.3f} exact {metrics['exact_match']:.2f}")

  return on_metrics, progress


def _write_history(directory: pathlib.Path, history) -> None:
  common.write_jsonl(directory / "metrics.jsonl", history)
  (directory / "metrics.live.jsonl").unlink(missing_ok=True)


def mark_copy_texts(rows: data_lib.Encoded, world: task_common.World,
                    fact_free_eos: bool) -> data_lib.Encoded:
  """Corpus rows (in `world.corpus` order) with the EOS of every fact-free copy text left
  out of the loss, unless `fact_free_eos`."""
  if fact_free_eos or not world.fact_free:
    return rows
  free = set(world.fact_free)
  return data_lib.untrain_tail(rows, [int(t in free) for t in world.corpus])


def pretraining_data(p: config_lib.PretrainSection, world: task_common.World,
                     tokenizer) -> data_lib.Encoded:
  """The corpus as the base model trains on it: encoded, marked, packed if `p.row_len`."""
  rows = mark_copy_texts(tok_lib.encode_corpus(tokenizer, world.corpus), world,
                         p.fact_free_eos)
  if p.row_len:
    rows = data_lib.pack(rows, p.row_len, pad_id=tokenizer.pad_token_id)
  return rows


def pretrained_base(cfg: RecyclingStudy, world: task_common.World, tokenizer, cache: pathlib.Path,
                    seed: int) -> Base:
  """Our base model pretrained on the world's corpus (cached), or the HF checkpoint."""
  if cfg.model.hf_path:
    from lora_limits.interop import hf  # torch-free, but keep the import where it is used
    model_cfg, params, hf_tok = hf.load_checkpoint(cfg.model.hf_path)
    return Base(model_cfg, params, hf_tok, _digest({"hf": cfg.model.hf_path}),
                {"hf_path": cfg.model.hf_path})
  model_cfg = cfg.model.model_config(len(tokenizer))
  key = _digest({"world": task_common.content_hash(world), "model": model_cfg.to_dict(),
                 "pretrain": schema.to_dict(cfg.pretrain), "seed": seed,
                 "vocab": tok_lib.vocab_ids(tokenizer)})
  directory = cache / "base" / key
  info_path = directory / "base.json"
  p = cfg.pretrain
  corpus_data = pretraining_data(p, world, tokenizer)
  loop = train_lib.LoopConfig(steps=p.steps, batch_size=p.batch_size, seed=seed, loss_on="all",
                              save_every=p.save_every)
  optim = train_lib.OptimConfig(learning_rate=p.learning_rate, warmup_steps=p.warmup_steps,
                                weight_decay=p.weight_decay)
  directory.mkdir(parents=True, exist_ok=True)
  on_metrics, progress = _progress(directory, f"pretrain seed {seed}", p.steps)
  start = time.time()
  with distributed.exclusive(directory):  # shards of a sweep may share this base
    params, history = train_lib.pretrain(
        model_cfg, corpus_data, optim=optim, loop=loop, checkpoint_dir=str(directory / "ckpt"),
        record={"model": model_cfg.to_dict()}, on_metrics=on_metrics,
        mesh=distributed.training_mesh())
    _write_history(directory, history)
  if info_path.exists():
    info = json.loads(info_path.read_text())
  else:
    progress.close()
    recall = _exact(params, model_cfg, tokenizer, world.recall, cfg.eval_batch_size)
    info = {"key": key, "steps": p.steps, "final_loss": history[-1]["loss"],
            "recall_exact_match": recall, "recall_n": len(world.recall),
            "num_params": transformer.num_params(params),
            "train_seconds": round(time.time() - start, 1)}
    common.write_json(info_path, info)
  common.log(f"base seed {seed}: {info['num_params']:,} params, recall exact match "
             f"{info['recall_exact_match']:.3f} on {info['recall_n']} corpus facts")
  return Base(model_cfg, params, tokenizer, key, info)


def _exact(params, model_cfg, tokenizer, examples, batch_size, lora=None) -> float:
  rows = tok_lib.encode_examples(tokenizer, examples)
  out = exact_match.teacher_forced(params, model_cfg, rows, lora=lora, batch_size=batch_size,
                                pad_id=tokenizer.pad_token_id)
  return float(np.mean(out["exact"]))


def adapter_examples(world: task_common.World, name: str,
                     distractors: int = 0) -> list[task_common.Example]:
  """Training examples of adapter `name`, pooled over every tier of the world.

  distractor<i>: the i-th of `distractors` disjoint slices of facts the corpus states about
  filler entities (two-hop) or counting (math) — knowledge no test question needs, so such an
  adapter can only interfere.
  """
  if name.startswith("distractor"):
    i = int(name.removeprefix("distractor"))
    if not 1 <= i <= distractors:
      raise ValueError(f"adapter {name!r} does not exist with distractors={distractors}")
    pool = [e for e in world.recall
            if (e.meta.get("group") == "filler" and e.meta.get("hop"))  # two-hop fillers
            or e.meta.get("source") == "counting"]  # math: "after 3 comes 4 ."
    if len(pool) < distractors:
      raise ValueError(f"recycle.distractors={distractors} exceeds the {len(pool)} irrelevant "
                       "facts the world has for them")
    return pool[i - 1::distractors]
  splits = {"target": ("target", "target_cot"),
            "all": ("union", "target", "target_cot")}.get(name, (name,))
  # Groups without training splits (the two-hop world's filler probes) contribute nothing.
  return [e for group in world.groups for s in splits for e in world.splits[group].get(s, ())]


def replay_texts(world: task_common.World, count: int, seed: int) -> list[str]:
  """`count` pretraining texts drawn without replacement (seeded; the same for every adapter
  of a seed): what an adapter rehearses so it keeps what the base knew."""
  if count <= 0:
    return []
  rng = np.random.default_rng([seed, 13])
  idx = rng.choice(len(world.corpus), size=min(count, len(world.corpus)), replace=False)
  return [world.corpus[i] for i in sorted(idx)]


def _ending(examples) -> list[int]:
  """Closing tokens of each answer that are not part of what it states: the EOS, and a
  statement's closing period ("A 's spouse is" → "B ." states B)."""
  return [2 if e.meta.get("format") == "statement" else 1 for e in examples]


def _as_text(e: task_common.Example) -> task_common.Example:
  """A statement example trained as text: its first word the prompt, the rest the answer."""
  if e.meta.get("format") != "statement":
    return e
  first, rest = e.prompt.split(" ", 1) if " " in e.prompt else (e.prompt, "")
  return task_common.Example(first, f"{rest} {e.answer}".strip(), e.meta)


def in_context(examples: Sequence[task_common.Example], copies: int,
               seed: int) -> list[task_common.Example]:
  """`copies` extra versions of every statement example, each after another statement of
  `examples` (drawn seeded, never itself): "B2 lives in C2 . B lives in" → "C ."; the
  prefix is context, not a target. Nothing enters that the adapter's data does not hold."""
  statements = [e for e in examples if e.meta.get("format") == "statement"]
  if copies <= 0 or len(statements) < 2:
    return []
  rng = np.random.default_rng([seed, 29])
  out = []
  for i, e in enumerate(statements):
    for _ in range(copies):
      j = int(rng.integers(len(statements) - 1))
      other = statements[j + (j >= i)]
      out.append(task_common.Example(f"{other.prompt} {other.answer} {e.prompt}", e.answer,
                                     dict(e.meta, context=other.prompt)))
  return out


def adapter_data(cfg: RecyclingStudy, tokenizer, world: task_common.World,
                 examples, seed: int):
  """The rows an adapter trains on: its examples and the replay sample (loss on the answers,
  without their ending unless `adapters.train_ending`, and on every token of a replayed
  text), packed when `adapters.row_len` is set. Returns (the examples' rows, the data)."""
  a = cfg.adapters
  if a.statements == "text":
    examples = [_as_text(e) for e in examples]
  # After _as_text: a copy's prefix is context whichever way its statement trains.
  examples = list(examples) + in_context(examples, a.in_context, seed)
  rows = tok_lib.encode_examples(tokenizer, examples)
  if not a.train_ending:
    rows = data_lib.untrain_tail(rows, _ending(examples))
  replay = replay_texts(world, int(round(a.replay * len(examples))), seed)
  parts = [rows] + ([tok_lib.encode_corpus(tokenizer, replay)] if replay else [])
  data = data_lib.concat(parts, tokenizer.pad_token_id)
  if a.row_len:
    data = data_lib.pack(data, a.row_len, pad_id=tokenizer.pad_token_id, loss_on="answer")
  return rows, data


# Rows of the seeded sample the stop criterion checks before it checks every training row.
_STOP_PROBE_ROWS = 256


def criterion_met(exact_of: Callable[[data_lib.Encoded], np.ndarray], rows: data_lib.Encoded,
                  stop_accuracy: float, seed: int) -> bool:
  """Whether the exact match over `rows` (`exact_of(rows)`: one bool per row) is at least
  `stop_accuracy`. A seeded sample of `_STOP_PROBE_ROWS` rows is checked first: when its
  misses alone keep the accuracy below the criterion, so do all rows, and the full check
  (most of a stop check's cost on a large adapter) is skipped."""
  n = data_lib.size(rows)
  if n > _STOP_PROBE_ROWS:
    sample = np.sort(np.random.default_rng([seed, 31]).permutation(n)[:_STOP_PROBE_ROWS])
    misses = int(np.sum(~np.asarray(exact_of(data_lib.take(rows, sample)), bool)))
    if (n - misses) / n < stop_accuracy:
      return False
  return float(np.mean(exact_of(rows))) >= stop_accuracy


def trained_adapter(cfg: RecyclingStudy, base: Base, world: task_common.World, name: str,
                    cache: pathlib.Path, seed: int) -> tuple[lora_lib.Adapter, dict]:
  """Adapter `name` trained on its split (cached), with its own training accuracy."""
  examples = adapter_examples(world, name, cfg.recycle.distractors)
  a = cfg.adapters
  key = _digest({"base": base.key, "adapter": name, "seed": seed,
                 "examples": [e.to_dict() for e in examples], "settings": schema.to_dict(a)})
  directory = cache / "adapters" / f"{name}-{key}"
  info_path = directory / "adapter.json"
  rows, data = adapter_data(cfg, base.tokenizer, world, examples, seed)
  loop = train_lib.LoopConfig(steps=a.max_steps, batch_size=a.batch_size,
                              seed=seed * 1000 + _adapter_index(name),
                              loss_on="answer", eval_every=a.eval_every)
  optim = train_lib.OptimConfig(learning_rate=a.learning_rate, warmup_steps=a.warmup_steps)

  def reached(step: int, adapter) -> bool:
    if step < a.min_steps:
      return False
    mix = lora_lib.LoraMix.single(adapter)
    return criterion_met(
        lambda subset: exact_match.teacher_forced(
            base.params, base.cfg, subset, lora=mix, batch_size=cfg.eval_batch_size,
            pad_id=base.tokenizer.pad_token_id)["exact"],
        rows, a.stop_accuracy, seed)

  directory.mkdir(parents=True, exist_ok=True)
  on_metrics, progress = _progress(directory, f"adapter {name} seed {seed}", a.max_steps)
  with distributed.exclusive(directory):
    adapter, history, stopped = train_lib.train_lora(
        base.params, base.cfg, a.spec, data, optim=optim, loop=loop,
        checkpoint_dir=str(directory / "ckpt"), record={"adapter": name},
        on_metrics=on_metrics, stop_fn=reached, mesh=distributed.training_mesh())
    _write_history(directory, history)
  if info_path.exists():
    info = json.loads(info_path.read_text())
  else:
    progress.close(stopped or a.max_steps)
    train_acc = _exact(base.params, base.cfg, base.tokenizer, examples, cfg.eval_batch_size,
                       lora_lib.LoraMix.single(adapter))
    info = {"adapter": name, "steps": stopped or a.max_steps, "stopped_early": stopped is not None,
            "train_exact_match": train_acc, "n_train": len(examples),
            "criterion": f"exact match >= {a.stop_accuracy} on its training data, checked "
                         f"every {a.eval_every} steps from step {a.min_steps}, at most "
                         f"{a.max_steps} steps"}
    common.write_json(info_path, info)
  common.log(f"adapter {name} seed {seed}: {info['steps']} steps, train exact match "
             f"{info['train_exact_match']:.3f} (n={info['n_train']})")
  return adapter, info


def _adapter_index(name: str) -> int:
  """A stable small integer per adapter name (it keys the adapter's init and data order)."""
  fixed = ("hop1", "hop2", "target", "union", "all")
  return fixed.index(name) if name in fixed else 10 + int(name.removeprefix("distractor"))
