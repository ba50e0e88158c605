"""Sweep: Library size: 0..6 distractor adapters (irrelevant filler facts) added to each library, i.e. 2..8 adapters in the 2-combination library (shared base per seed).

Run:
  python -m experiments.run --config=configs/sweep_library.py --workdir=runs/sweep_library
Variant `:quick` uses one seed. Outputs sweep.md and sweep.png (accuracy vs `recycle.distractors` per
recycling method, 2-combination library, with intervals and chance) and each value's full
report under runs/. Not part of `make run`: it repeats the pipeline once per value.
"""

from configs import _sweep


def get_config(variant: str = ""):
  return _sweep.sweep_config("recycle.distractors", (0, 1, 2, 4, 6), variant)
