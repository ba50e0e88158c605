"""Study 'recycling': the paper's experiment end to end (two-hop or math), then its report.

world → base model → adapters → recycling → evaluation, one seed at a time. For each seed:
build the world (every familiarity tier at once, sharing one pretraining corpus), pretrain
the base model on it, train one adapter per training split (`hop1`, `hop2`, `target`
(direct and chain-of-thought questions on entities disjoint from the tests), `union`,
`all`), each stopping at `stop_accuracy` exact match on its own training data; recycle the
libraries {hop1, hop2} and {hop1, hop2, target} with every configured method of the
recycler registry; evaluate everything on every test split of every group (the tiers and
the filler probes) with greedy exact match, the chance level and the majority baseline;
then the seed's gates and each recycled model's retention (`experiments.verdicts`).

Modules, one job each: `config` (the typed sections and `parse`), `stages` (the cached base
model and adapters), `models` (controls and recycled models), `evaluation` (records per
tier × split), `units` (per-seed files), `report` (report.md and figures from
`results.jsonl` alone).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence

from experiments import common
from experiments import distributed
from experiments import schema
from experiments import verdicts
from experiments.studies.recycling import config as config_lib
from experiments.studies.recycling import evaluation
from experiments.studies.recycling import models as models_lib
from experiments.studies.recycling import report
from experiments.studies.recycling import stages
from experiments.studies.recycling import units
from lora_limits import tokenizer as tok_lib
from lora_limits.tasks import corpus as corpus_lib

parse = config_lib.parse
RecyclingStudy = config_lib.RecyclingStudy
ADAPTERS = config_lib.ADAPTERS


def run_seed(cfg: RecyclingStudy, seed: int, cache: pathlib.Path, tokenizer,
             timings: dict[str, float] | None = None) -> list[dict]:
  """One seed's records: every model × tier × test split, then each adapter's training
  accuracy."""
  with common.stage(f"seed {seed}: world", timings):
    world = config_lib.build_world(cfg, seed)
    corpus_lib.check_no_leak(world)
  with common.stage(f"seed {seed}: base model", timings):
    base = stages.pretrained_base(cfg, world, tokenizer, cache, seed)
  adapters, infos = {}, {}
  with common.stage(f"seed {seed}: adapters", timings):
    names = ADAPTERS + config_lib.library_names("two", cfg.recycle.distractors)[2:]
    for name in names:
      adapters[name], infos[name] = stages.trained_adapter(cfg, base, world, name, cache, seed)
  cents = models_lib.centroids(cfg, base, world, list(adapters))
  models = models_lib.controls(base, adapters)
  with common.stage(f"seed {seed}: recycling", timings):
    for library in cfg.recycle.libraries:
      models += models_lib.recycled_models(cfg, base, world, adapters, library, seed, cents)
  records = []
  common.log(f"seed {seed}: {len(models)} models to evaluate")
  with common.stage(f"seed {seed}: evaluation", timings):
    progress = common.Progress(f"evaluate seed {seed}", len(models), every=5.0)
    for i, model in enumerate(models):
      records += evaluation.evaluate_model(model, base, world, cfg.task, seed,
                                           cfg.eval_batch_size)
      progress.update(i + 1, f"{model.library}/{model.method}")
  for rec in records:
    rec["base_recall"] = base.info.get("recall_exact_match")
  records = verdicts.with_retention(records, k=world.k)
  gates = verdicts.compute_gates(records, cfg.gates.thresholds, task=cfg.task, seed=seed,
                                 k=world.k)
  for g in gates:
    common.log(f"seed {seed}: gate {g['split'].removeprefix('gate_')} "
               f"{g['accuracy']:.2f} ({'>=' if g['direction'] == 'min' else '<='} "
               f"{g['threshold']:.2f}): {'pass' if g['passed'] else 'FAIL'}")
  records += gates
  for name, info in infos.items():
    records.append({"task": cfg.task, "tier": "all", "library": "single", "method": name,
                    "answer_format": "direct", "split": f"train_{name}", "seed": seed,
                    "accuracy": info["train_exact_match"], "n": info["n_train"],
                    "chance": None, "data_free": True, "steps": info["steps"]})
  return records


def run(cfg: RecyclingStudy, workdir: pathlib.Path,
        seeds: Sequence[int] | None = None) -> pathlib.Path | None:
  """The study's `seeds` (default: this job's shard of `cfg.seeds`, i.e. all of them unless
  `experiments.run` got --num_shards); returns the path of `results.jsonl` once every seed
  of the study has its unit, else None (other shards have yet to finish theirs). Finished
  seeds (their unit files) are read back, not recomputed."""
  start = time.time()
  cache = pathlib.Path(cfg.cache_dir) if cfg.cache_dir else workdir / "cache"
  common.write_json(workdir / "config.json", schema.to_dict(cfg))
  tokenizer = tok_lib.build([" ".join(config_lib.vocabulary(cfg))])
  if common.is_writer():
    tokenizer.save_pretrained(str(workdir / "tokenizer"))
  timings: dict[str, float] = {}
  key = units.config_key(schema.to_dict(cfg))
  todo = []
  for seed in distributed.mine(cfg.seeds) if seeds is None else seeds:
    unit = units.unit_path(workdir, cfg.task, seed)
    if units.read_unit(unit, key) is not None:
      common.log(f"seed {seed}: results already in {unit}; skipping")
    else:
      todo.append(seed)
  distributed.agree(f"units of {workdir} checked")  # before any process writes one
  for seed in todo:
    records = run_seed(cfg, seed, cache, tokenizer, timings)
    units.write_unit(units.unit_path(workdir, cfg.task, seed), records, key)
  results = units.assemble(workdir, cfg.task, cfg.seeds)
  timings["total"] = round(time.time() - start, 2)
  common.write_json(workdir / "timings.json", timings)
  common.log(f"{cfg.task}: {common.format_seconds(time.time() - start)}")
  return results


def main(config, workdir: pathlib.Path) -> None:
  cfg = parse(config)
  results = run(cfg, workdir)
  if results is not None:  # None: other shards' seeds unfinished, or not process 0
    report.write_report(workdir, results)
