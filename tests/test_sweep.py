"""The sweep study: one pipeline per value, a shared cache, one table and plot."""

import pytest
from ml_collections import config_dict

from configs import smoke, sweep_exposure, sweep_library, sweep_rank
from experiments import common, schema
from experiments.studies import sweep


def _config(field="adapters.rank", values=(1, 2)):
  base = smoke.get_config()
  base.recycle.methods = ("sum",)
  base.recycle.libraries = ("two",)
  c = config_dict.ConfigDict()
  c.study = "sweep"
  c.sweep = config_dict.ConfigDict(dict(field=field, values=values))
  c.base = base
  return c


def test_sweep_runs_every_value_and_shares_the_base(tmp_path):
  sweep.main(_config(), tmp_path)
  records = common.read_jsonl(tmp_path / "sweep_results.jsonl")
  assert {r["sweep_value"] for r in records} == {1, 2}
  assert {r["sweep_field"] for r in records} == {"adapters.rank"}
  assert len(list((tmp_path / "cache" / "base").iterdir())) == 1  # one base for both ranks
  assert len(list((tmp_path / "cache" / "adapters").iterdir())) == 10  # 5 adapters x 2 ranks
  assert "| sum |" in (tmp_path / "sweep.md").read_text()
  assert (tmp_path / "sweep.png").stat().st_size > 1000


@pytest.mark.parametrize("field,values,match", [
    ("adapters.rnk", (1,), r"'rnk' is not a field"),
    ("adapterz.rank", (1,), r"'adapterz' is not a section"),
    ("adapters.rank", (0,), r"with adapters.rank=0"),
    ("adapters.rank", (), r"sweep.values must list at least one value"),
])
def test_bad_sweeps_are_refused_before_compute(field, values, match):
  with pytest.raises(schema.ConfigError, match=match):
    sweep.parse(_config(field, values))


@pytest.mark.parametrize("module", [sweep_rank, sweep_library, sweep_exposure])
def test_shipped_sweep_configs_parse(module):
  cfg, studies = sweep.parse(module.get_config())
  assert len(studies) == len(cfg.sweep.values) >= 5
