"""The pre-flight study: HF + PEFT mode end to end, reports, validation summary, config."""

import json
import math

import jax
import numpy as np
import pytest

from configs import preflight as preflight_config
from experiments.studies import preflight as study
from lora_limits import lora as lora_lib
from lora_limits.interop import hf, peft
from lora_limits.models import transformer


def test_report_files_from_random_adapters(tmp_path):
  e = np.eye(8, dtype=np.float32)
  params = {"layers": {str(l): {"attn_norm": {"scale": np.ones(8)}} for l in range(2)}}
  ads = {"hop1": {"layers/0/attn/o_proj/kernel": lora_lib.LoraFactors(e[:, :2], e[2:4], 1.0)},
         "hop2": {"layers/0/attn/o_proj/kernel": lora_lib.LoraFactors(e[:, 4:6], e[:2], 1.0)}}
  rep = study.pf.check_library(params, ads, [study.pf.MethodConfig("sum", "sum"),
                                             study.pf.MethodConfig("mean", "uniform_delta")])
  study.write_preflight(tmp_path, "random", {"two": rep})
  saved = json.loads((tmp_path / "preflight.json").read_text())["libraries"]["two"]
  assert saved["methods"]["sum"]["retention"] == pytest.approx({"hop1": 1.0, "hop2": 1.0})
  assert saved["methods"]["mean"]["retention"] == pytest.approx({"hop1": 0.5, "hop2": 0.5})
  md = (tmp_path / "preflight.md").read_text()
  assert "sum keeps every adapter" in md
  assert "no bridge path hop1 -> hop2 (no later adapted layer" in md
  assert (tmp_path / "figures" / "retention_two.png").stat().st_size > 0


@pytest.mark.slow
def test_hf_checkpoint_and_peft_adapters(tmp_path):
  cfg = transformer.ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                tie_embeddings=False)
  params = transformer.init(jax.random.key(0), cfg)
  hf.export_checkpoint(params, cfg, tmp_path / "ckpt", arch="llama")
  dirs = []
  for i, name in enumerate(("hop1", "hop2")):
    spec = lora_lib.LoraConfig(rank=2, alpha=4.0)
    ad = lora_lib.init(jax.random.key(i), params, spec)
    ad = {p: lora_lib.LoraFactors(f.a, jax.random.normal(jax.random.fold_in(jax.random.key(9), i),
                                                         f.b.shape), f.scale)
          for p, f in ad.items()}
    peft.save_adapter(ad, tmp_path / name, num_layers=2)
    dirs.append(f"{name}={tmp_path / name}")
  c = preflight_config.get_config("hf")
  c.hf_path = str(tmp_path / "ckpt")
  c.peft_dirs = tuple(dirs)
  c.methods = ("sum", "svd", "arrow")
  out = tmp_path / "out"
  out.mkdir()
  study.main(c, out)
  rep = json.loads((out / "preflight.json").read_text())["libraries"]["library"]
  assert rep["adapters"] == ["hop1", "hop2"]
  assert set(rep["methods"]) == {"sum", "svd", "arrow"}
  assert all(0.0 <= v <= 1.0 for e in rep["methods"].values() for v in e["retention"].values())
  assert {(b["writer"], b["reader"]) for b in rep["bridge"]} == {("hop1", "hop2"),
                                                                 ("hop2", "hop1")}
  assert all(b["pairs"] > 0 for b in rep["bridge"])  # two layers: later readers exist
  md = (out / "preflight.md").read_text()
  assert "Library `library`" in md and "Verdicts" in md
  assert (out / "figures" / "retention_library.png").stat().st_size > 0


def _row(i, predicted, measured, sims):
  return {"setting": f"s{i % 3}", "library": "two", "method": f"m{i}", "adapter": "hop1",
          "predicted": predicted, "predicted_probe": predicted, "measured": measured,
          "measured_exact": measured, "measured_test": None,
          **{f"baseline_{k}": s for k, s in zip(study.BASELINES, sims)},
          "bridge_exists": False, "direct_above_chance": False, "base_can_compose": False,
          "predicted_cot": predicted, "cot_accuracy": measured / 2}


def test_summary_ranks_the_prediction_against_the_baselines():
  rng = np.random.default_rng(0)
  rows = [_row(i, p, p + 0.01 * rng.normal(), rng.random(3)) for i, p in
          enumerate(np.linspace(0, 1, 12))]
  s = study.summarise(rows, seed=0, n_boot=100)
  assert s["n_points"] == 12
  assert s["retention_spearman"]["preflight"]["rho"] > 0.95
  assert s["goal_rho_0_8"] and s["goal_beats_baseline_by_0_1"]
  assert s["composition"]["where_base_can_compose"] == 0 and s["composition"]["agreement"] is None
  text = study.validation_markdown(s, rows, ["a", "b"], 60.0)
  assert "unmeasurable" in text and "met" in text


def test_grid_entries_and_modes_are_checked():
  base = preflight_config.validation_study_config(preflight_config.get_config("validate"))
  name, c = study._setting_config(base, "two_hop:2:mlp:1:3")
  assert name == "two_hop_2_mlp_1_3"
  assert (c.adapters.rank, c.recycle.distractors, c.seeds) == (2, 1, (3,))
  assert c.adapters.targets == study.TARGETS["mlp"]
  for bad, match in (("two_hop:2:mlp:1", "task:rank"), ("math:2:mlp:0:0", "task"),
                     ("two_hop:2:ffn:0:0", "targets")):
    with pytest.raises(ValueError, match=match):
      study._setting_config(base, bad)
  c = preflight_config.get_config()
  c.mode = "nope"
  with pytest.raises(ValueError, match=r"config: mode=.nope. is not one of"):
    study.main(c, None)
  with pytest.raises(ValueError, match="variant"):
    preflight_config.get_config("bogus")


def test_read_study_refuses_a_directory_without_config(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    study.read_study(tmp_path)


def test_pooled_and_chance_helpers():
  recs = [{"library": "two", "split": "x", "accuracy": 0.5, "n": 4, "chance": 0.25},
          {"library": "two", "split": "x", "accuracy": 1.0, "n": 4, "chance": 0.25}]
  acc, chance, n = study._pooled(recs, library="two", split="x")
  assert (acc, chance, n) == (0.75, 0.25, 8)
  assert study._pooled(recs, library="one") is None
  assert study._above_chance(0.75, 0.25, 8) and not study._above_chance(0.3, 0.25, 8)
  assert math.isclose(study._pooled(recs, split="x")[0], 0.75)
