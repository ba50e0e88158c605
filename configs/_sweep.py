"""Shared body of the sweep configs (`configs/sweep_*.py`)."""

from ml_collections import config_dict

from configs import two_hop

METHODS = ("uniform_factors", "uniform_delta", "sum", "ties", "cat", "arrow")


def sweep_config(field: str, values: tuple, variant: str) -> config_dict.ConfigDict:
  """A 'sweep' study over `field` on the two-hop study (`:quick`: one seed)."""
  base = two_hop.get_config()
  base.recycle.methods = METHODS
  if variant == "quick":
    base.seeds = (0,)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; allowed: '', 'quick'")
  c = config_dict.ConfigDict()
  c.study = "sweep"
  c.sweep = config_dict.ConfigDict(dict(field=field, values=values))
  c.base = base
  return c
