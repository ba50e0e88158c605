"""The paper's two-hop study on all three familiarity tiers (the default `make run`).

Run:
  python -m experiments.run --config=configs/two_hop.py --workdir=runs/two_hop
Variants: `configs/two_hop.py:quick` (one seed, three methods); `:large` (a 4x larger base
model pretrained 4x longer; several times slower).
Expected: each one-hop adapter >= 95% on its own facts; the 2-combination library near
chance on two-hop questions about tier-F entities; see runs/two_hop/report.md.
"""

from ml_collections import config_dict

from lora_limits import lora


def get_config(variant: str = "") -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.study = "recycling"
  c.task = "two_hop"
  c.seeds = (0, 1, 2)
  c.cache_dir = ""
  c.world = config_dict.ConfigDict(dict(
      test_chains=24, target_chains=24, filler_chains=64, pool_size=8,
      background_exposure=4, fact_exposure=8, hybrid="background", filler_two_hop=True))
  c.model = config_dict.ConfigDict(dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=0,
                                        d_ff=192, max_len=64, tie_embeddings=True, hf_path=""))
  c.pretrain = config_dict.ConfigDict(dict(steps=2500, batch_size=64, learning_rate=3e-3,
                                           warmup_steps=50, weight_decay=0.0, save_every=500))
  c.adapters = config_dict.ConfigDict(dict(
      rank=8, alpha=16.0, targets=lora.DEFAULT_TARGETS, rslora=False, dropout=0.0,
      max_steps=600, batch_size=32, learning_rate=5e-3, warmup_steps=10, stop_accuracy=0.95,
      eval_every=25))
  c.recycle = config_dict.ConfigDict(dict(
      libraries=("two", "two_plus_target"),
      # Any name of the recycler registry (lora_limits.recycle.recyclers.registry()).
      methods=("uniform_factors", "uniform_delta", "sum", "ties", "dare_ties", "cat", "svd",
               "knots", "arrow", "oracle", "lorahub", "similarity"),
      # Per method, options over the registry entry's defaults.
      options=dict(ties=dict(density=0.5), dare_ties=dict(density=0.5), svd=dict(rank=8),
                   knots=dict(inner="ties", density=0.5),
                   arrow=dict(top_k=1, temperature=1.0), lorahub=dict(generations=20, shots=16),
                   similarity=dict(top_k=1)),
      distractors=0))
  c.eval_batch_size = 64
  if variant == "quick":
    c.seeds = (0,)
    c.recycle.methods = ("uniform_factors", "sum", "arrow")
  elif variant == "large":
    # A stronger base model for users with time: ~4x the parameters, 4x the pretraining.
    c.world.filler_chains = 128
    c.model.update(dict(d_model=128, d_ff=344))
    c.pretrain.update(dict(steps=4000, batch_size=64, save_every=1000))
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; allowed: '', 'quick', 'large'")
  return c
