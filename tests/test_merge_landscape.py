"""The merge_landscape study end to end on a tiny config; config validation; simplex plots."""

import json

import ml_collections
import numpy as np
import pytest

from configs import merge_landscape as landscape_config
from experiments import schema
from experiments.studies import merge_landscape as study_lib


def tiny_config() -> ml_collections.ConfigDict:
  config = landscape_config.get_config()
  config.world.n_entities = 6
  config.model.d_model = 16
  config.model.n_layers = 1
  config.model.n_heads = 2
  config.model.d_ff = 24
  config.train.pretrain_steps = 0  # a random base: the pretraining path is the lead's, and slow to compile
  config.train.lora_steps = 3
  config.train.batch_size = 4
  config.train.rank = 2
  config.grid.steps = 3
  config.methods = ("mix", "uniform_factors")
  return config


def test_tiny_run_writes_scores_and_heat_maps(tmp_path):
  study_lib.main(tiny_config(), tmp_path)
  out = json.loads((tmp_path / "landscape.json").read_text())
  grid = np.asarray(out["grid"])
  assert grid.shape == (9, 2)
  np.testing.assert_allclose(sorted(set(grid[:, 0])), [-1.0, 0.5, 2.0])
  for method in ("mix", "uniform_factors"):
    for task in ("task_1", "task_2"):
      scores = out["scores"][method][task]
      assert sorted(scores) == ["exact_match", "loss"]
      assert len(scores["loss"]) == 9 and np.all(np.isfinite(scores["loss"]))
      assert all(0.0 <= v <= 1.0 for v in scores["exact_match"])
  # uniform_factors is even in w (the product of the averaged factors), mix is not.
  loss_uf = np.asarray(out["scores"]["uniform_factors"]["task_1"]["loss"])
  neg = [int(np.nonzero(np.all(np.isclose(grid, -g), 1))[0][0]) if np.any(
      np.all(np.isclose(grid, -g), 1)) else -1 for g in grid]
  assert all(i == -1 or np.isclose(loss_uf[i], loss_uf[j], rtol=1e-4)
             for j, i in enumerate(neg))
  assert json.loads((tmp_path / "config.json").read_text())["grid"]["steps"] == 3
  for metric in ("exact_match", "loss"):
    assert (tmp_path / f"landscape_{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simplex_grid_and_plot(tmp_path):
  config = tiny_config()
  config.num_adapters = 3
  config.grid.kind = "simplex"
  study = schema.build(study_lib.LandscapeStudy, config)
  grid = study_lib.weight_grid(study)
  assert grid.shape == (6, 3)
  np.testing.assert_allclose(grid.sum(1), 1.0)
  rng = np.random.default_rng(0)
  scores = {"mix": {f"task_{k}": {"exact_match": rng.uniform(size=6).tolist()}
                    for k in (1, 2, 3)}}
  study_lib.plot_landscape(study, grid, scores, "exact_match", tmp_path / "s.png")
  assert (tmp_path / "s.png").stat().st_size > 1000
  assert landscape_config.get_config("simplex3").num_adapters == 3


@pytest.mark.parametrize("field,value,match", [
    ("methods", ("mix", "avg"), r"config.methods has 'avg'; allowed: \['mix'"),
    ("num_adapters", 3, r"grid.kind='square' needs num_adapters=2"),
    ("metrics", ("bleu",), r"config.metrics has 'bleu'"),
    ("ties_density", 0.0, r"ties_density must be in \(0, 1\]"),
])
def test_bad_config_names_the_field(field, value, match):
  config = tiny_config()
  config[field] = value
  with pytest.raises(ValueError, match=match):
    schema.build(study_lib.LandscapeStudy, config)


def test_unknown_key_is_rejected():
  config = tiny_config().to_dict()
  config["grid"]["stpes"] = 3
  with pytest.raises(ValueError, match=r"config.grid: unknown key\(s\) \['stpes'\]"):
    schema.build(study_lib.LandscapeStudy, config)
