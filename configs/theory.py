"""The paper's rank-expressiveness statements, checked numerically in the one-layer toy.

Run:
  python -m experiments.run --config=configs/theory.py --workdir=runs/theory
Variants: `--config.two_hop.expert_source=closed_form`, `--config.readout=train`,
`--config.seed=1`, `--config.toy.two_hop_carry=0.0`, `--config.arrow.top_k='(1,)'`.

Expected (2-core CPU, about 20 s, 2026-11-29; seed 0): results.json with all_passed true.
Proposition 1: the GD-trained rank-one LoRA matches the closed form (cosine 0.9995, relative
error 3.1 %, growing linearly with the init scale; from the usual LoRA init 0.75); 77 % of
single-fact edits flip no other fact. Multi-fact (m = 16): the rank-16 edit fits all 16,
exact fits never exceed r, residuals equal Eckart–Young, argmax accuracy reaches 100 % at
r = 14. Theorem 2 (32 chains, 128 entities): each expert 100 % on its hop, target adapter
100 %; sum, mean of updates, mean of factors and Arrow (top-1, top-2) 0 % on the two-hop
prompt (chance 1/128) — the sum answers the bridge B on every chain; library + target 69 %.
With the bridge stated (CoT) the sum answers 100 %.
Plots: prop1_trained_vs_closed_form.png, accuracy_vs_rank.png, two_hop_accuracy.png.
"""

import dataclasses

import ml_collections

from lora_limits.theory import kv_model as kv


def _fields(obj) -> dict:
  """A library config record (toy model, GD schedule) as a dict, its defaults included."""
  return dataclasses.asdict(obj)


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      study="theory", seed=0,
      toy=_fields(kv.KVConfig(n_entities=128, d_ff=512)),
      readout="lstsq", readout_steps=400,
      chance_z=3.0,  # 'at chance': accuracy <= 1/N + z·√(p(1−p)/m)
      prop1=dict(entity=0, relation=0, cosine_min=0.99, relative_error_max=0.05,
                 gd=_fields(kv.GDConfig(steps=300, learning_rate=0.2, init_scale=1e-3,
                                        record_every=2))),
      multi_fact=dict(n_facts=16, ranks=(), fit_tolerance=1e-3,
                      gd=_fields(kv.GDConfig(steps=3000, learning_rate=0.1, init_scale=1e-3))),
      two_hop=dict(n_chains=32, expert_source="trained", rank=0, one_hop_min=0.95,
                   target_min=0.95, bridge_min=0.95,
                   gd=_fields(kv.GDConfig(steps=3000, learning_rate=0.1, init_scale=1e-3))),
      arrow=dict(top_k=(1, 2), temperature=1.0)))
