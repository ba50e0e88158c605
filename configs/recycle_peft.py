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
Expected: W/results.jsonl (one record per method and group), W/report.md (a table of exact
match and answer log-likelihood for the base, each adapter, every merge and router),
W/figures/. Measured 2026-12-02 on the tiny random Llama of tests/test_recycle_peft.py (3
adapters, 8 questions, the 18 methods that apply without few-shot data or general adapters,
export=peft_ties): 2m10s wall, 46 s of CPU (user), at nice 19 on this 2-core machine shared at
a load average of ~3.6; most of it merging and compiling each method (~5 s a method).
"""

import dataclasses

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  from experiments.studies import recycle_peft  # the typed defaults live with the study
  study = recycle_peft.RecyclePeftStudy()
  return ml_collections.ConfigDict({f.name: getattr(study, f.name)
                                    for f in dataclasses.fields(study)})
