"""A miniature of the two-hop study: tiny world, one seed, two methods (< 1 minute).

Run:
  python -m experiments.run --config=configs/smoke.py --workdir=runs/smoke
Expected: results.jsonl and report.md in the workdir. The numbers mean little (the model
barely trains); this config exists to exercise every stage quickly (tests, CI, resume).
"""

from ml_collections import config_dict

from configs import two_hop


def get_config(variant: str = "") -> config_dict.ConfigDict:
  if variant:
    raise ValueError(f"unknown variant {variant!r}; configs/smoke.py has none")
  c = two_hop.get_config()
  c.seeds = (0,)
  c.world.update(dict(test_chains=4, target_chains=4, filler_chains=24, pool_size=4,
                      background_exposure=1, fact_exposure=1, filler_repeats=1))
  c.model.update(dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=64))
  c.pretrain.update(dict(steps=40, batch_size=4, row_len=64, warmup_steps=5, save_every=20))
  c.adapters.update(dict(rank=2, alpha=4.0, max_steps=20, batch_size=4, row_len=64,
                         eval_every=10, replay=0.5))
  c.recycle.methods = ("sum", "arrow")
  c.recycle.options.svd.rank = 2
  c.recycle.options.lorahub.generations = 2
  return c
