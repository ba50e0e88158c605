"""Sweep: Familiarity as a continuous axis: how many pretraining texts state each tier-R fact (a new base model per value and seed).

Run:
  python -m experiments.run --config=configs/sweep_exposure.py --workdir=runs/sweep_exposure
Variant `:quick` uses one seed. Outputs sweep.md and sweep.png (accuracy vs `world.fact_exposure` per
recycling method, 2-combination library, with intervals and chance) and each value's full
report under runs/. Not part of `make run`: it repeats the pipeline once per value.
"""

from configs import _sweep


def get_config(variant: str = ""):
  return _sweep.sweep_config("world.fact_exposure", (1, 2, 4, 8, 16), variant)
