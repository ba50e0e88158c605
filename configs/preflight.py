"""Pre-flight check (issue 16): predict from the adapters alone what recycling keeps.

Run (a finished single-seed recycling-study workdir):
  python -m experiments.run --config=configs/preflight.py --config.source=runs/smoke \
      --workdir=runs/preflight
Run (a Hugging Face checkpoint and PEFT adapter directories):
  python -m experiments.run --config=configs/preflight.py:hf --config.hf_path=ckpt \
      --config.peft_dirs="('hop1=ad1','hop2=ad2')" --workdir=runs/preflight_hf
Validation study (runs its own small recycling studies, then predicts and measures them):
  python -m experiments.run --config=configs/preflight.py:validate --workdir=runs/preflight_val
Writes preflight.json and preflight.md (validate: also validation.md/.json, settings.jsonl,
figures/).
Measured 2026-12-02 (2-core machine shared with ~20 processes, niced; only the first two grid
entries finished in the time available:
--config.grid="('two_hop:4:all:0:0','two_hop:4:mlp:0:0')"): 36 settings, 72 points. Spearman ρ
of predicted key retention vs measured graded retention (answer-NLL) = -0.34 [-0.52, -0.12];
probe variant -0.28; baselines: task-vector cosine 0.31, subspace overlap 0.33, CKA -0.09. Both
retention goals MISSED: in this tiny regime full-strength merges (sum, cat) push the facts' NLL
above the base model while averages keep the most, the opposite of what the key-space score
predicts. Composition goal unmeasurable: the base model composes in no setting (target adapter
at chance on direct two-hop).
"""

from ml_collections import config_dict

from configs import smoke

MERGES = ("uniform_factors", "uniform_delta", "sum", "ties", "dare_ties", "cat", "svd", "knots")

# task:rank:targets:distractors:seed — one small recycling study each.
GRID = ("two_hop:4:all:0:0", "two_hop:4:mlp:0:0", "two_hop:2:attn:0:0", "two_hop:8:all:2:0",
        "two_hop:4:attn:0:1", "two_hop:2:all:0:0", "two_hop:8:mlp:0:0", "two_hop:4:all:2:0")


def validation_study_config(config) -> config_dict.ConfigDict:
  """The recycling study each grid entry modifies: the smoke world, trained long enough for
  the one-hop adapters to learn their facts. The study itself evaluates only `sum` and
  `arrow` (its generation-based test records feed the composition columns); the pre-flight
  predicts and measures every data-free method itself (teacher-forced, cheap)."""
  c = smoke.get_config()
  c.pretrain.update(dict(steps=config.pretrain_steps))
  c.adapters.update(dict(max_steps=config.adapter_steps, learning_rate=1e-2, eval_every=25))
  c.recycle.methods = ("sum", "arrow")
  return c


def get_config(variant: str = "") -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.study = "preflight"
  c.mode = "workdir"
  c.source = ""
  c.hf_path = ""
  c.peft_dirs = ("",)
  c.methods = MERGES[:3] + ("ties", "svd", "arrow")
  c.grid = GRID
  c.pretrain_steps = 300
  c.adapter_steps = 200
  c.n_boot = 2000
  c.bootstrap_seed = 0
  if variant == "hf":
    c.mode = "hf"
  elif variant == "validate":
    c.mode = "validate"
  elif variant == "validate_quick":  # two studies, for a smoke test of the whole path
    c.mode = "validate"
    c.grid = GRID[:2]
    c.pretrain_steps = 40
    c.adapter_steps = 20
    c.n_boot = 200
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; allowed: '', 'hf', 'validate', "
                     "'validate_quick'")
  return c
