"""The benchmark harness runs end to end at tiny sizes (no timing is asserted: benchmarks are
not tests), writes results.json with every part and BENCHMARKS.md, and its contenders agree:
ours, the jitted loop and the PEFT + torch loop give the same scores; our and torch's
training steps give the same losses."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from bench import common  # noqa: E402
from bench import report  # noqa: E402
from bench import run as bench_run  # noqa: E402
from bench import scoring  # noqa: E402
from lora_limits.models import transformer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("bench")
  e2e = root / "e2e"
  e2e.mkdir()
  (e2e / "timings.json").write_text(json.dumps(
      {"seed 0: world": 1.5, "seed 0: base model": 30.0, "total": 42.0}))
  (e2e / "config.json").write_text(json.dumps({"study": "recycling", "seeds": [0, 1]}))
  options = bench_run.Options(mode="tiny", out_dir=root / "out", markdown=root / "B.md",
                              scratch=root / "scratch", e2e_workdir=e2e,
                              command="pytest tiny run")
  bench_run.run(options)
  return root, json.loads((root / "out" / "results.json").read_text())


def test_results_have_every_part_and_target(tiny_run):
  _, results = tiny_run
  assert set(results["parts"]) == set(bench_run.PARTS)
  assert results["mode"] == "tiny" and results["machine"]["cores"] >= 1
  for part in results["parts"].values():
    assert {"date_utc", "load_before", "command"} <= set(part["measured"])
  for name in ("scoring", "training", "utilisation", "scaling"):  # long enough to measure
    assert results["parts"][name]["measured"]["other_cores_during"] >= 0
  scoring_part = results["parts"]["scoring"]
  for cell in scoring_part["cells"]:
    assert set(scoring.CONTENDERS) <= set(cell)
    assert cell["ours"]["combos_per_s"] > 0 and cell["ours"]["xla_temp_bytes"] > 0
  assert all(c["within_budget"] for c in scoring_part["memory_check"])
  assert [t["target"] for t in results["targets"]][0].startswith("few-shot")
  assert len(results["targets"]) == 10
  models = results["parts"]["training"]["models"]
  assert {"ours_lora", "ours_full", "torch_lora", "torch_full"} <= set(models["tiny"])
  profile = models["tiny"]["profile"]["ours_lora"]
  assert profile["ops_in_program"]["matmul"] > 0 and profile["ms_per_step"]["matmul"] > 0
  util = results["parts"]["utilisation"]
  assert util["matmul"]["peak_gflops"] > 0 and util["train"]["tiny"]["lora"]["flops_xla"] > 0
  assert set(results["parts"]["scaling"]["sweeps"]) == {
      "num_combinations", "num_adapters", "rank", "examples", "d_model", "chunk"}
  e2e = results["parts"]["e2e"]
  assert e2e["found"] and e2e["stages"]["total"] == 42.0 and e2e["complete"] is False
  pk = results["parts"]["packing"]
  # Layout facts, not speed: packing computes fewer pad tokens, and each side measured its rate.
  assert pk["packed_real_fraction"] > pk["padded_real_fraction"]
  assert pk["packed"]["real_tokens_per_step"] > pk["padded"]["real_tokens_per_step"]
  assert pk["ratio"] > 0 and pk["padded"]["real_tokens_per_s"] > 0
  assert any(t["target"].startswith("packed pretraining") and t["met"] is not None
             for t in results["targets"])


def test_three_contenders_agree_on_scores_and_losses(tiny_run):
  _, results = tiny_run
  loops = results["parts"]["scoring"]["loops"]
  assert loops
  for loop in loops:
    diffs = loop["agreement"]["max_abs_diff_by_contender"]
    assert set(diffs) == {"jax_loop", "peft", "peft_1thread"}
    assert max(diffs.values()) <= scoring.AGREEMENT_ATOL
    # the check can fail: the combinations' scores differ by far more than the tolerance
    assert loop["agreement"]["score_spread"] > 100 * scoring.AGREEMENT_ATOL
  for cell in results["parts"]["scoring"]["cells"]:
    assert cell["agreement"]["agree"]
  diffs = results["parts"]["training"]["models"]["tiny"]["loss_max_abs_diff"]
  assert max(diffs.values()) <= 1e-4


def test_markdown_and_figures_are_written(tiny_run):
  root, results = tiny_run
  text = (root / "B.md").read_text()
  for heading in ("## Targets", "## 1. Scoring", "## 2. LoRA training", "## 3. Utilisation",
                  "## 4. Scaling", "## 5. Packed pretraining", "## 6. End to end",
                  "## What bounds the results"):
    assert heading in text
  assert results["machine"]["cpu_model"] in text and "pytest tiny run" in text
  assert "partial" in text  # the e2e timings cover seed 0 of seeds [0, 1]
  for name in ("scoring.png", "training.png", "scaling.png"):
    assert (root / "out" / "figures" / name).stat().st_size > 0


def test_rerun_of_one_part_keeps_the_others(tiny_run, tmp_path):
  root, results = tiny_run
  out = tmp_path / "out"
  out.mkdir()
  (out / "results.json").write_text(json.dumps(results))
  bench_run.run(bench_run.Options(parts=("e2e",), mode="tiny", out_dir=out,
                                  markdown=tmp_path / "B.md", e2e_workdir=tmp_path / "none"))
  again = json.loads((out / "results.json").read_text())
  assert again["parts"]["scoring"] == results["parts"]["scoring"]
  assert again["parts"]["e2e"]["found"] is False
  assert "not measured" in (tmp_path / "B.md").read_text()


def test_flop_counts_are_close_to_xla(tiny_run):
  """The analytic matmul count is near XLA's count of the same train step (XLA adds the
  element-wise work) and counts what it says."""
  _, results = tiny_run
  for kind in ("lora", "full"):
    e = results["parts"]["utilisation"]["train"]["tiny"][kind]
    assert 0.7 <= e["flops_xla"] / e["flops_analytic"] <= 1.5
  cfg = transformer.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=48)
  f = common.forward_flops(cfg, 2, 8, lora_k=3, lora_rank=2)
  assert f["kernels"] == 2 * 16 * (4 * 32 * 32 + 3 * 32 * 48)
  assert f["lora"] == 2 * 16 * 3 * 2 * (4 * 64 + 3 * 80)
  assert common.train_step_flops(cfg, 2, 8, kind="lora", lora_rank=2) < common.train_step_flops(
      cfg, 2, 8, kind="full")
  with pytest.raises(ValueError, match="kind='half'"):
    common.train_step_flops(cfg, 2, 8, kind="half")


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="mode='fast'"):
    bench_run.Options(mode="fast")
  with pytest.raises(ValueError, match="plots"):
    bench_run.Options(parts=("scoring", "plots"))
  with pytest.raises(ValueError, match="one list per examples value"):
    scoring.ScoringSizes(examples=(8,), combinations=((16,), (64,)))
  targets = report.targets({"parts": {}})
  assert len(targets) == 10 and all(t["met"] is None for t in targets)


def test_a_failing_part_is_recorded_and_raised(tiny_run, tmp_path, monkeypatch):
  _, results = tiny_run
  out = tmp_path / "out"
  out.mkdir()
  (out / "results.json").write_text(json.dumps(results))

  def broken(*args, **kwargs):
    raise KeyError("boom")

  monkeypatch.setattr(bench_run.scaling, "run", broken)
  with pytest.raises(RuntimeError, match=r"\['scaling'\] failed"):
    bench_run.run(bench_run.Options(parts=("scaling",), mode="tiny", out_dir=out,
                                    markdown=tmp_path / "B.md", e2e_workdir=tmp_path))
  again = json.loads((out / "results.json").read_text())
  assert "KeyError: 'boom'" in again["parts"]["scaling"]["error"]
  assert again["parts"]["training"] == results["parts"]["training"]
  assert "**This part failed**" in (tmp_path / "B.md").read_text()
