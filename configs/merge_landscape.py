"""Merge landscape: scores of every weight vector of a grid over K trained adapters.

Run:
  python -m experiments.run --config=configs/merge_landscape.py --workdir=runs/merge_landscape
Variants: `--config=configs/merge_landscape.py:simplex3` (3 adapters on the simplex),
`--config.methods='("mix","uniform_factors","ties","svd","knots")'`, `--config.grid.steps=21`.

Expected (shared 2-core CPU, 2026-11-29, 35–45 s: training 10–30 s; seed 0): 169 weight vectors
on [-1, 2]² scored for 3 methods × 2 tasks in 6 calls (≈10 s including compiles). Each adapter
alone answers its own relation (exact match 1.0 at e_1 and e_2 for 'mix'); the base (w = 0)
answers neither (0.0). The adapters interfere: the sum w = (1, 1) solves neither task (exact
match 0.06 / 0.03), nor does the average of updates at (0.5, 0.5) (0.19 / 0.13) or of factors
(0.03 / 0.03); 'uniform_factors' is even in w ((−1, 0) equals e_1: 1.0); TIES at density 0.5
keeps most of a single adapter (0.94 / 0.97 at e_k) and also fails at (1, 1) (0.09 / 0.06).
landscape.json holds every score; landscape_exact_match.png and landscape_loss.png the maps.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      study="merge_landscape", seed=0, num_adapters=2,
      methods=("mix", "uniform_factors", "ties"), ties_density=0.5,
      metrics=("exact_match", "loss"),
      chunk_size=0,  # 0: the largest within memory_budget_gb
      memory_budget_gb=4.0,
      world=dict(n_entities=32),
      model=dict(d_model=64, n_layers=2, n_heads=4, d_ff=128),
      train=dict(pretrain_steps=300, lora_steps=400, batch_size=32, learning_rate=3e-3,
                 lora_learning_rate=3e-3, rank=8, alpha=16.0),
      grid=dict(kind="square", steps=13, low=-1.0, high=2.0)))
  if variant == "simplex3":
    config.num_adapters = 3
    config.grid.kind = "simplex"
    config.grid.steps = 11
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; available: 'simplex3'")
  return config
