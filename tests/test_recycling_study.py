"""The recycling study in miniature: records' schema, report, resume, config errors, HF base."""

import dataclasses
import json
import pathlib
import shutil

import jax
import pytest

from configs import smoke
from experiments import common, schema
from experiments.studies import recycling
from experiments.studies.recycling import report
from lora_limits import tokenizer as tok_lib
from lora_limits.models import transformer
from lora_limits.recycle import merge as merge_lib
from lora_limits.recycle import recyclers
from lora_limits.tasks import common as task_common


def _smoke(**overrides):
  c = smoke.get_config()
  for dotted, value in overrides.items():
    node = c
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _scaled_sum(resources, options):
  """A recycler registered by this test only: the sum of the library's updates, scaled."""
  merged = merge_lib.merge(list(resources.adapters), "sum", scale=options["scale"])
  return recyclers.Recycled(merged.apply(resources.params), extra={"scale": options["scale"]})


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The smoke study, with one more method registered here (and nowhere else)."""
  workdir = tmp_path_factory.mktemp("smoke")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(recyclers, "_REGISTERED", dict(recyclers._REGISTERED))
    recyclers.register(recyclers.Recycler("scaled_sum", _scaled_sum, options={"scale": 1.0}))
    c = _smoke()
    c.recycle.methods = tuple(c.recycle.methods) + ("scaled_sum",)
    c.recycle.options.scaled_sum = {"scale": 0.5}
    cfg = recycling.parse(c)
    results = recycling.run(cfg, workdir)
    report.write_report(workdir, results)
  yield workdir, cfg  # the registration ended with the context


def test_a_registered_method_reaches_the_results(smoke_run):
  workdir, cfg = smoke_run
  records = common.read_jsonl(workdir / "results.jsonl")
  mine = [r for r in records if r["method"] == "scaled_sum"]
  assert {r["library"] for r in mine} == set(cfg.recycle.libraries)
  # Per library: 4 groups (tiers F, H, R and the filler probes) × 5 splits, the CoT split
  # giving a strict and a lenient record.
  assert len(mine) == len(cfg.recycle.libraries) * 4 * 6
  assert all(r["data_free"] and r["extra"] == {"scale": 0.5} for r in mine)
  assert "scaled_sum" not in recyclers.registry()  # the registration ended with the fixture


def test_records_cover_every_model_tier_and_split(smoke_run):
  workdir, cfg = smoke_run
  records = common.read_jsonl(workdir / "results.jsonl")
  evals = [r for r in records if not r["split"].startswith(("train_", "gate_"))]
  for r in evals:
    assert set(report.REQUIRED) <= set(r)
    assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] > 0 and 0.0 < r["chance"] < 1.0
    assert r["chance"] <= r["majority"] < 1.0
  models = {(r["library"], r["method"]) for r in evals}
  expected = {("none", "base")} | {("single", n) for n in recycling.config.CONTROLS[1:]}
  expected |= {(lib, m) for lib in cfg.recycle.libraries for m in cfg.recycle.methods}
  assert models == expected
  assert {r["tier"] for r in evals} == {"F", "H", "R", "filler"}
  assert {r["split"] for r in evals} == {"test_hop1", "test_hop2", "test_two_hop_direct",
                                          "test_two_hop_cot", "test_two_hop_bridge"}
  assert all("bridge_accuracy" in r for r in evals if r["answer_format"] == "cot")
  assert {r["answer_format"] for r in evals if r["split"] == "test_two_hop_cot"} == {
      "cot", "cot_lenient"}
  assert len(evals) == len(expected) * 4 * 6
  train = [r for r in records if r["split"].startswith("train_")]
  assert {r["method"] for r in train} == {"hop1", "hop2", "target", "union", "all"}
  recycled = [r for r in evals if r["library"] in cfg.recycle.libraries and r["tier"] != "filler"]
  assert recycled and all("retention" in r for r in recycled)
  gates = [r for r in records if r["split"].startswith("gate_")]
  assert {g["split"] for g in gates} == {
      "gate_base_extraction", "gate_base_cot", "gate_base_leak", "gate_expert_hop1",
      "gate_expert_hop2", "gate_bridge_stated", "gate_union_cot"}
  assert all(isinstance(g["passed"], bool) and g["threshold"] is not None for g in gates)


def test_report_and_figures_exist(smoke_run):
  workdir, _ = smoke_run
  text = (workdir / "report.md").read_text()
  assert text.index("### Gates, per seed") < text.index("### The paper's claims") < text.index(
      "### Controls")
  assert "figures/two_hop_a_tier.png" in text
  assert (workdir / "figures" / "two_hop_a_tier.png").stat().st_size > 1000
  assert (workdir / "figures" / "two_hop_b_familiarity.png").stat().st_size > 1000
  config = json.loads((workdir / "config.json").read_text())
  assert config["task"] == "two_hop" and config["seeds"] == [0]


def test_report_regenerates_from_results_alone(smoke_run, tmp_path):
  workdir, _ = smoke_run
  (tmp_path / "results.jsonl").write_text((workdir / "results.jsonl").read_text())
  assert report.main(["report", str(tmp_path)]) == 0
  assert (tmp_path / "report.md").read_text() == (workdir / "report.md").read_text()


def test_rerun_reuses_completed_seeds(smoke_run, monkeypatch):
  workdir, cfg = smoke_run
  before = (workdir / "results.jsonl").read_bytes()
  monkeypatch.setattr(recycling, "run_seed", lambda *a, **k: pytest.fail("recomputed a seed"))
  recycling.run(cfg, workdir)
  assert (workdir / "results.jsonl").read_bytes() == before


@pytest.mark.parametrize("overrides,match", [
    ({"task": "poetry"}, r"task='poetry' is not one of"),
    ({"recycle.methods": ("sum", "magic")}, r"recycle.methods has 'magic'"),
    ({"recycle.options.ties.density": 0.0},
     r"recycle.options.ties: density=0.0 must be a number in \(0, 1\]"),
    ({"adapters.rank": 0}, r"LoraConfig.rank must be a positive int|adapters.rank must be > 0"),
    ({"seeds": (-1,)}, r"seeds must be >= 0"),
    ({"world.test_chains": 0}, r"test_chains"),
])
def test_bad_config_is_refused_before_compute(overrides, match):
  with pytest.raises(schema.ConfigError, match=match):
    recycling.parse(_smoke(**overrides))


def test_wrong_type_is_refused():
  d = _smoke().to_dict()
  d["pretrain"]["steps"] = "many"
  with pytest.raises(schema.ConfigError, match=r"config.pretrain.steps must be an int, got str"):
    recycling.parse(d)


def test_unknown_config_key_is_refused():
  c = _smoke()
  c.unlock()
  c.model.depth = 3
  with pytest.raises(schema.ConfigError, match=r"config.model: unknown key\(s\) \['depth'\]"):
    recycling.parse(c)


def test_runs_on_a_hugging_face_checkpoint(tmp_path):
  """--config.model.hf_path: a tiny random Llama checkpoint (written here) as the base."""
  cfg = recycling.parse(_smoke())
  vocab = recycling.config.vocabulary(cfg)
  tok = tok_lib.build([" ".join(vocab)])
  mcfg = transformer.ModelConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2,
                                 d_ff=64, tie_embeddings=False)
  params = transformer.init(jax.random.key(0), mcfg)
  from lora_limits.interop import hf
  hf.export_checkpoint(params, mcfg, tmp_path / "ckpt", arch="llama", tokenizer=tok)
  run_cfg = recycling.parse(_smoke(**{"model.hf_path": str(tmp_path / "ckpt"),
                                     "recycle.methods": ("sum",),
                                     "recycle.libraries": ("two",)}))
  results = recycling.run(run_cfg, tmp_path / "work")
  records = common.read_jsonl(results)
  assert {(r["library"], r["method"]) for r in records} >= {("none", "base"), ("two", "sum")}
  assert not (tmp_path / "work" / "cache" / "base").exists()  # no pretraining happened


def test_prompts_go_through_a_chat_template_when_the_tokenizer_has_one():
  tok = tok_lib.build(["who is the spouse of ka ro ? mi"])
  plain = tok_lib.prompt_ids(tok, "who is the spouse of ka ro ?")
  assert plain[0] == tok.bos_token_id and len(plain) == 9
  tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} ?{% endfor %}"
  templated = tok_lib.prompt_ids(tok, "who is the spouse of ka ro")
  assert templated == plain
  rows = tok_lib.encode_examples(tok, [task_common.Example("who is the spouse of ka ro", "mi")])
  assert list(rows["tokens"][0][:9]) == plain


def test_rerun_with_another_config_recomputes_the_seed(smoke_run, monkeypatch, tmp_path):
  workdir, cfg = smoke_run
  work = tmp_path / "w"
  shutil.copytree(workdir / "units", work / "units")
  records = recycling.units.read_unit(workdir / "units" / "two_hop-seed0.jsonl")
  calls = []

  def fake_run_seed(cfg, seed, *args, **kwargs):
    calls.append(seed)
    return records

  monkeypatch.setattr(recycling, "run_seed", fake_run_seed)
  recycling.run(cfg, work)
  assert calls == []  # same config: the unit is reused
  other = dataclasses.replace(cfg, eval_batch_size=cfg.eval_batch_size + 1)
  recycling.run(other, work)
  assert calls == [0]  # another config: its stale unit is recomputed...
  recycling.run(other, work)
  assert calls == [0]  # ... and then kept
