"""Recycle your own PEFT LoRA adapters on your base model and questions (study `recycle_peft`).

Run:
  python -m experiments.run --config=configs/recycle_peft.py --workdir=W \
      --config.base=/path/to/hf_checkpoint --config.adapters=/path/a,/path/b \
      --config.eval=questions.jsonl
Optional: --config.fewshot=shots.jsonl (LoraHub, similarity selection; disjoint from eval),
--config.general=/path/g1,/path/g2 (GenKnowSub), --config.methods='("peft_ties","wudi","arrow")'
(names of the recycler registry, `lora_limits.recycle.recyclers`; default: every method that
applies to the adapters, PEFT flavour), --config.export=peft_ties (writes that merge as a PEFT
adapter to W/export/peft_ties/), --config.weights='(1.0,-0.5)', --config.dtype=bfloat16
and --config.shard=True (FSDP over every accelerator).
Eval / few-shot files: one {"prompt": ..., "answer": ...[, "group": ...]} JSON object per line.
Expected: W/results.jsonl (one record per method and group; a method's record of all questions
carries its pre-flight prediction), W/report.md (a table of exact match and answer
log-likelihood for the base, each adapter, every merge and router, and the pre-flight's
predicted retention of each adapter beside the measured exact match), W/preflight.json,
W/figures/. `--config.preflight=False` skips the pre-flight.
Measured 2026-12-03 on the tiny random Llama of tests/test_recycle_peft.py (3 adapters, 8
questions, the 18 methods that apply without few-shot data or general adapters,
export=peft_ties), nice 19 on this 2-core machine while another job used most of it: 61 s
wall, 28 s of CPU (user), of which ~6 s imports (jax, transformers, torch), ~14 s compiling
one XLA program per merge method (0.1-1.6 s each; the evaluation already shares one compiled
forward across all merges), ~3.5 s compiling the base's and the adapters' forward, ~2.5 s
Arrow's, ~1.3 s figures. The wall time follows the other job: the same command took 3m09s
for 32 s of CPU an hour earlier, when it got 17 % of a core. On the quiet machine, the same
day and command: 22.3 s wall, 28 s of CPU.
"""

import dataclasses

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  from experiments.studies import recycle_peft  # the typed defaults live with the study
  study = recycle_peft.RecyclePeftStudy()
  return ml_collections.ConfigDict({f.name: getattr(study, f.name)
                                    for f in dataclasses.fields(study)})
