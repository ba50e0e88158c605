"""One process of the multi-process tests: pretrain the smoke base and train its hop1 adapter.

  python tests/multiproc_worker.py WORKDIR [--num_processes=2 --process_id=i --port=P]
      [--steps=N]

Joins the job through `experiments.distributed.initialize` (what `experiments.run` calls),
then runs the study's own `pretrained_base` and `trained_adapter` on configs/smoke.py, which
train data parallel over every process's devices and save orbax checkpoints from all of
them into WORKDIR/cache. Process 0 writes the final parameters to WORKDIR/final.npz and the
step each checkpoint directory held when this run started to WORKDIR/started.json; the
losses are in the cache's metrics.jsonl files. Each process fakes one CPU device.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir", type=pathlib.Path)
  parser.add_argument("--num_processes", type=int, default=0)
  parser.add_argument("--process_id", type=int, default=-1)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--steps", type=int, default=0, help="pretraining steps (0: smoke's)")
  parser.add_argument("--tiny", action="store_true",
                      help="only pretrain a micro model for a few steps (the fast test)")
  return parser.parse_args(argv)


def smoke_config(steps: int = 0):
  from configs import smoke
  from experiments.studies import recycling
  config = smoke.get_config()
  if steps:
    config.pretrain.steps = steps
  return recycling.parse(config)


def train(workdir: pathlib.Path, steps: int = 0):
  """(base params, hop1 adapter, {cache dir: step found at start}) of the smoke study."""
  from experiments.studies.recycling import config as config_lib
  from experiments.studies.recycling import stages
  from lora_limits import checkpoint
  from lora_limits import tokenizer as tok_lib
  cfg = smoke_config(steps)
  world = config_lib.build_world(cfg, 0)
  tokenizer = tok_lib.build([" ".join(config_lib.vocabulary(cfg))])
  cache = workdir / "cache"
  started = {str(d.parent.relative_to(workdir)): checkpoint.Checkpointer(d).latest_step()
             for d in sorted(cache.glob("*/*/ckpt"))}
  base = stages.pretrained_base(cfg, world, tokenizer, cache, 0)
  adapter, _ = stages.trained_adapter(cfg, base, world, "hop1", cache, 0)
  return base.params, adapter, started


TINY_STEPS, TINY_BATCH = 4, 8


def tiny(workdir: pathlib.Path):
  """A micro model pretrained for TINY_STEPS steps on fixed random tokens, checkpointed at
  the end into WORKDIR/ckpt; returns (params, loss history, optimizer)."""
  import numpy as np

  from experiments import distributed
  from lora_limits import data, train
  from lora_limits.models import transformer
  cfg = transformer.ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, d_ff=16,
                                max_len=8)
  rng = np.random.default_rng(0)
  rows = data.encode([(list(rng.integers(3, 16, 3)), list(rng.integers(3, 16, 2)))
                      for _ in range(24)], eos_id=1, pad_id=0)
  optim = train.OptimConfig(warmup_steps=0)
  loop = train.LoopConfig(steps=TINY_STEPS, batch_size=TINY_BATCH, loss_on="all")
  params, history = train.pretrain(cfg, rows, optim=optim, loop=loop,
                                   checkpoint_dir=str(workdir / "ckpt"),
                                   mesh=distributed.training_mesh())
  return params, history, train.make_optimizer(optim, TINY_STEPS)


def main(argv) -> int:
  args = parse_args(argv)
  import jax
  jax.config.update("jax_num_cpu_devices", 1)
  from experiments import common, distributed
  settings = distributed.ProcessConfig(
      "auto", f"127.0.0.1:{args.port}" if args.port else "", args.num_processes,
      args.process_id)
  if distributed.initialize(settings, env={}):
    common.set_writer(jax.process_index() == 0)
  import json

  import numpy as np

  from lora_limits import tree
  if args.tiny:
    params, history, _ = tiny(args.workdir)
    if jax.process_index() == 0:
      np.savez(args.workdir / "final.npz", **{k: np.asarray(v)
                                               for k, v in tree.flatten(params).items()})
      (args.workdir / "history.json").write_text(json.dumps(history))
    return 0
  params, adapter, started = train(args.workdir, args.steps)
  if jax.process_index() == 0:
    flat = {f"base/{k}": np.asarray(v) for k, v in tree.flatten(params).items()}
    flat.update({f"adapter/{k}/{f}": np.asarray(getattr(v, f))
                 for k, v in adapter.items() for f in ("a", "b")})
    np.savez(args.workdir / "final.npz", **flat)
    (args.workdir / "started.json").write_text(json.dumps(started))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
