"""Sweep: Adapter rank vs two-hop accuracy (the base model is pretrained once per seed and shared by all ranks).

Run:
  python -m experiments.run --config=configs/sweep_rank.py --workdir=runs/sweep_rank
Variant `:quick` uses one seed. Outputs sweep.md and sweep.png (accuracy vs `adapters.rank` per
recycling method, 2-combination library, with intervals and chance) and each value's full
report under runs/. Not part of `make run`: it repeats the pipeline once per value.
"""

from configs import _sweep


def get_config(variant: str = ""):
  return _sweep.sweep_config("adapters.rank", (1, 2, 4, 8, 16, 32, 64), variant)
