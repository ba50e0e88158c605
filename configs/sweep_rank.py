"""Sweep: Adapter rank vs two-hop accuracy (the base model is pretrained once per seed and shared by all ranks).

Run:
  python -m experiments.run --config=configs/sweep_rank.py --workdir=runs/sweep_rank
Variant `:quick` uses one seed. Outputs sweep.md and sweep.png (accuracy vs `adapters.rank` per
recycling method, 2-combination library, with intervals and chance) and each value's full
report under runs/. Not part of `make run`: it repeats the pipeline once per value.
"""

from ml_collections import config_dict

from configs import two_hop


def get_config(variant: str = "") -> config_dict.ConfigDict:
  base = two_hop.get_config()
  base.recycle.methods = ("uniform_factors", "uniform_delta", "sum", "ties", "cat", "arrow")
  if variant == "quick":
    base.seeds = (0,)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; allowed: '', 'quick'")
  c = config_dict.ConfigDict()
  c.study = "sweep"
  c.sweep = config_dict.ConfigDict(dict(field="adapters.rank", values=(1, 2, 4, 8, 16, 32, 64)))
  c.base = base
  return c
