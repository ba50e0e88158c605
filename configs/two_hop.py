"""The paper's two-hop study on three familiarity tiers (the default `make run`).

Run:
  python -m experiments.run --config=configs/two_hop.py --workdir=runs/two_hop
Variants: `:quick` (one seed, the primary methods and two more); `:syllables` (the ablation:
names spelled in 2-3 syllable tokens instead of one token each); `:large` (a larger base
model pretrained longer).

The world (see `lora_limits/tasks/two_hop.py`): person →spouse→ person →lives_in→ city, one
shared pool of 16 cities in balance (chance = majority baseline = 1/16). The tiers differ
only in what pretraining says about their entities: F nothing (their names appear only in
fact-free copy texts), H background sentences, R the facts themselves. Fillers carry the
language, extraction (question-answer pairs) and the chain-of-thought procedure (composed
questions of 40% of them); statement-only and never-composed fillers are the probes of the
first two gates.
Where text ends is not trained where it would teach the chain of thought to stop: the EOS
of a fact-free copy text ("echo A . A") in pretraining (`pretrain.fact_free_eos`), and the
ending (EOS, a statement's period) of every adapter answer (`adapters.train_ending`).
Trained, they cut chains of thought short after a copied name. `make run` on 2026-12-02,
seeds 0/1/2, with them → without: base CoT on never-composed fillers 0.97/0.78/0.91 →
1.00/0.97/1.00; hop2 on tier-F bridge-stated questions 0.81/0.75/0.75 → 0.59/0.97/0.38
(hop2 recalled wrong cities mid-chain). An adapter's statements are therefore also trained
after another statement of its own data (`adapters.in_context=2` copies each): `make run`
on 2026-12-03 (the same base models as the day before): hop2 on tier-F bridge-stated
questions 1.00/1.00/1.00, every gate passed on seeds 1 and 2, seed 0's experts 0.84/0.84
on held-out forms (gate 0.9). So statements are now trained as text
(`adapters.statements='text'`: the loss on every word after the subject) at a lower rate for
longer (`learning_rate=5e-3`, `max_steps=800`).
`make run` on 2026-12-03 with them: every gate passed on every seed (held-out forms hop1
0.94/0.97/0.94, hop2 0.91/1.00/0.97; tier-F CoT strict union 0.72/0.81/0.25, all 1.00 on
each); statements as text at the old rate and length failed a gate on seeds 0 and 2
(union and all CoT 0.50/0.53 on seed 0, hop2 0.81 on seed 2).
Expected: the report opens with the gates per seed (base extraction and CoT on the probes,
no tier-F knowledge before adapters, experts on held-out forms, the positive control), then
the pre-registered claims and their verdicts.
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
      test_chains=32, target_chains=32, filler_chains=400, composed_share=0.4,
      statement_share=0.15, probe_chains=32, pool_size=16, name_style="token",
      background_exposure=4, fact_exposure=8, hybrid="background", fact_free_exposure=2,
      filler_repeats=2))
  c.model = config_dict.ConfigDict(dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=0,
                                        d_ff=384, max_len=128, tie_embeddings=True, hf_path=""))
  c.pretrain = config_dict.ConfigDict(dict(steps=600, batch_size=16, row_len=128,
                                           learning_rate=6e-3, warmup_steps=100,
                                           weight_decay=0.0, save_every=200,
                                           fact_free_eos=False))
  c.adapters = config_dict.ConfigDict(dict(
      rank=8, alpha=16.0, targets=lora.DEFAULT_TARGETS, rslora=False, dropout=0.0,
      max_steps=800, batch_size=8, learning_rate=5e-3, warmup_steps=20, stop_accuracy=1.0,
      min_steps=0, eval_every=25, replay=1.0, row_len=128, train_ending=False,
      statements="text", in_context=2))
  c.gates = config_dict.ConfigDict(dict(
      base_extraction=0.95, base_cot=0.9, base_leak=0.1, expert=0.9, bridge_stated=0.9,
      union_cot=0.6, union_cot_goal=0.8))
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
    c.recycle.methods = ("uniform_factors", "arrow", "sum", "ties")
  elif variant == "syllables":
    c.world.name_style = "syllables"
  elif variant == "large":
    # A stronger base model for users with time: ~3x the parameters, twice the pretraining.
    c.model.update(dict(d_model=192, d_ff=576))
    c.pretrain.update(dict(steps=1200, save_every=400))
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; allowed: '', 'quick', 'syllables', 'large'")
  return c
