"""Sweep: Familiarity as a continuous axis: how many pretraining texts state each tier-R fact (a new base model per value and seed).

Run:
  python -m experiments.run --config=configs/sweep_exposure.py --workdir=runs/sweep_exposure
Variant `:quick` uses one seed. Outputs sweep.md and sweep.png (accuracy vs `world.fact_exposure` per
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
  c.sweep = config_dict.ConfigDict(dict(field="world.fact_exposure", values=(1, 2, 4, 8, 16)))
  c.base = base
  return c
