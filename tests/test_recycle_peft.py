"""Study 'recycle_peft' end to end on a tiny random Llama and three PEFT adapters, offline.

The base is a `transformers.LlamaForCausalLM` with a word-level tokenizer, saved with
`save_pretrained`; the adapters are PEFT LoRA adapters with random A and B
(`init_lora_weights=False`), saved the same way. The command of the issue runs in a
subprocess; exported adapters are loaded back by PEFT and must give our merged model's logits.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

from configs import recycle_peft as recycle_config  # noqa: E402
from experiments import schema  # noqa: E402
from experiments.studies import recycle_peft as study_lib  # noqa: E402
from lora_limits import lora as lora_lib  # noqa: E402
from lora_limits import tokenizer as tok_lib  # noqa: E402
from lora_limits import tree as tree_lib  # noqa: E402
from lora_limits.interop import qa as qa_lib  # noqa: E402
from lora_limits.models import transformer  # noqa: E402
from lora_limits.recycle import merge as merge_lib  # noqa: E402
from lora_limits.recycle import recyclers  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("what is the capital of france italy spain ? paris rome madrid two plus three "
         "four five six seven one colour sky grass blue green").split()
EVAL = [("what is the capital of france ?", "paris", "geo"),
        ("what is the capital of italy ?", "rome", "geo"),
        ("what is the capital of spain ?", "madrid", "geo"),
        ("what is two plus three ?", "five", "math"),
        ("what is three plus four ?", "seven", "math"),
        ("what is one plus five ?", "six", "math"),
        ("what is the colour of sky ?", "blue", "colour"),
        ("what is the colour of grass ?", "green", "colour")]
FEWSHOT = [("what is two plus two ?", "four", "math"),
           ("the capital of france is", "paris", "geo"),
           ("the colour of sky is", "blue", "colour")]
ADAPTERS = {  # name: (seed, LoraConfig kwargs)
    "geo": (1, dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])),
    "math": (2, dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"])),
    "colour": (3, dict(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"])),
}


def _llama_config(vocab_size, tok, **kw):
  return tr.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, initializer_range=0.2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **kw)


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps({"prompt": p, "answer": a, "group": g}) + "\n"
                          for p, a, g in rows))
  return str(path)


def _torch_base(base):
  return tr.AutoModelForCausalLM.from_pretrained(base).eval()


def _peft_adapter(base, directory, seed, config):
  torch.manual_seed(seed)
  model = peft_lib.get_peft_model(_torch_base(base), peft_lib.LoraConfig(
      init_lora_weights=False, **config))
  with torch.no_grad():  # PEFT's random B is small; make each adapter matter
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.mul_(20.0)
  model.save_pretrained(directory)
  return str(directory)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("byo")
  tok = tok_lib.build([" ".join(WORDS)])
  base = root / "base"
  torch.manual_seed(0)
  tr.LlamaForCausalLM(_llama_config(len(tok), tok)).save_pretrained(base)
  tok.save_pretrained(base)
  adapters = {n: _peft_adapter(base, root / n, s, c) for n, (s, c) in ADAPTERS.items()}
  return {"root": root, "base": str(base), "adapters": adapters, "tok": tok,
          "eval": _write_jsonl(root / "eval.jsonl", EVAL),
          "fewshot": _write_jsonl(root / "fewshot.jsonl", FEWSHOT)}


def _config(world, **overrides) -> ml_collections.ConfigDict:
  c = recycle_config.get_config()
  c.base = world["base"]
  c.adapters = ",".join(world["adapters"].values())
  c.eval = world["eval"]
  c.lorahub_generations = 2
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _env():
  return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")


TOKENS = np.random.default_rng(0).integers(3, 20, (2, 9)).astype(np.int32)


def _peft_logits(base, adapter_dir):
  model = peft_lib.PeftModel.from_pretrained(_torch_base(base), adapter_dir).eval()
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def _our_logits(inputs, adapter):
  merged = lora_lib.merge(inputs.params, {p: lora_lib.LoraFactors(
      f.a.astype(jnp.float32), f.b.astype(jnp.float32), f.scale) for p, f in adapter.items()})
  return np.asarray(transformer.apply(merged, inputs.cfg, jnp.asarray(TOKENS)))


def _run_command(world, workdir, *extra):
  cmd = [sys.executable, "-m", "experiments.run", "--config=configs/recycle_peft.py",
         f"--workdir={workdir}", f"--config.base={world['base']}",
         f"--config.adapters={','.join(world['adapters'].values())}",
         f"--config.eval={world['eval']}", *extra]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "evaluate" in proc.stderr  # progress on the terminal
  records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
  assert {"base", "adapter:geo", "adapter:math", "adapter:colour"} <= {r["method"] for r in records}
  assert {r["group"] for r in records} == {"all", "geo", "math", "colour"}
  for r in records:
    assert 0.0 <= r["exact_match"] <= 1.0 and r["answer_loglik"] <= 0.0
    assert r["n"] == (len(EVAL) if r["group"] == "all" else
                      sum(g == r["group"] for _, _, g in EVAL))
  report = (workdir / "report.md").read_text()
  assert "| adapter:geo | single |" in report and "figures/exact_match.png" in report
  assert (workdir / "figures" / "exact_match.png").stat().st_size > 0
  assert (workdir / "figures" / "answer_loglik.png").stat().st_size > 0
  assert not [p for p in workdir.rglob(".*")]  # no temporary files left behind
  return records


@pytest.mark.slow  # the acceptance command in a subprocess (~1 min on 2 busy cores)
def test_the_command_runs_end_to_end_and_the_export_loads_in_peft(world, tmp_path):
  workdir = tmp_path / "w"
  records = _run_command(world, workdir, "--config.export=peft_ties",
                         '--config.methods=("peft_ties","wudi","arrow")')
  assert {r["method"] for r in records} == {"base", "adapter:geo", "adapter:math",
                                             "adapter:colour", "peft_ties", "wudi", "arrow"}
  assert json.loads((workdir / "config.json").read_text())["export"] == "peft_ties"
  # The exported adapter gives PEFT the logits of our merged model.
  study = study_lib.parse(_config(world, export="peft_ties"))
  inputs = study_lib.load_inputs(study)
  ours = _our_logits(inputs, study_lib.merged_adapter(study, inputs, "peft_ties"))
  theirs = _peft_logits(world["base"], workdir / "export" / "peft_ties")
  assert np.abs(ours - _our_logits(inputs, {})).max() > 1e-2  # the merge does something
  assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.slow
def test_every_method_runs_end_to_end(world, tmp_path):
  """The issue's command with few-shot data and a general adapter: every method applies."""
  records = _run_command(world, tmp_path / "w", f"--config.fewshot={world['fewshot']}",
                         f"--config.general={world['adapters']['colour']}",
                         "--config.lorahub_generations=2")
  assert {r["method"] for r in records} >= set(study_lib.default_methods())


@pytest.mark.parametrize("method", [
    "peft_cat", "wudi", pytest.param("peft_svd", marks=pytest.mark.slow),
    pytest.param("peft_dare_linear", marks=pytest.mark.slow)])
def test_exported_merges_give_peft_our_logits(world, tmp_path, method):
  study = study_lib.parse(_config(world, export=method, weights=(1.0, -0.5, 0.7)))
  inputs = study_lib.load_inputs(study)
  adapter = study_lib.merged_adapter(study, inputs, method)
  exported = study_lib.export_adapter(study, inputs, adapter, tmp_path)
  assert exported == tmp_path / "export" / method
  theirs = _peft_logits(world["base"], exported)
  np.testing.assert_allclose(_our_logits(inputs, adapter), theirs, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ bad input


def _run_main(config, workdir):
  workdir.mkdir(exist_ok=True)
  study_lib.main(config, workdir)


@pytest.mark.parametrize("text,match", [
    ('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answer": "d"}\n', r"line 2 is empty"),
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "c" "answer"}\n', r"line 2 is not valid JSON"),
    ('{"prompt": "a"}\n', r"line 1 lacks the field 'answer'"),
    ('["a", "b"]\n', r"line 1 is a JSON list"),
    ('{"prompt": "a", "answer": ""}\n', r"line 1: 'answer' must be a non-empty string"),
    ('{"prompt": "a", "answer": "b", "group": 3}\n', r"line 1: 'group' must be"),
    ("", r"holds no records"),
])
def test_malformed_eval_lines_are_named_by_file_and_line(tmp_path, text, match):
  path = tmp_path / "q.jsonl"
  path.write_text(text)
  with pytest.raises(ValueError, match=match) as info:
    qa_lib.read(path)
  assert str(path) in str(info.value)


def test_bad_inputs_are_config_errors_before_anything_is_written(world, tmp_path):
  bad_eval = tmp_path / "bad.jsonl"
  bad_eval.write_text('{"prompt": "what is the capital of france ?", "answer": "paris"}\n'
                      '{"prompt": "oops"}\n')
  unknown = tmp_path / "unknown.jsonl"
  unknown.write_text('{"prompt": "what is zebra ?", "answer": "paris"}\n')
  overlap = tmp_path / "overlap.jsonl"
  overlap.write_text(json.dumps({"prompt": EVAL[1][0], "answer": "x"}) + "\n")
  cases = [
      (dict(eval=str(bad_eval)), r"config.eval: .*bad.jsonl: line 2 lacks the field 'answer'"),
      (dict(eval=str(unknown)), r"unknown.jsonl: line 1: words \['zebra'\]"),
      (dict(eval=str(tmp_path / "none.jsonl")), r"config.eval: .*none.jsonl' is not a file; "
       r"expected a JSONL file with one \{\"prompt\": \.\.\., \"answer\""),
      (dict(fewshot=str(tmp_path / "none.jsonl")), r"config.fewshot: .*none.jsonl' is not a "
       "file; expected a JSONL file"),
      (dict(fewshot=str(overlap)), r"overlap.jsonl: line 1 asks the same prompt as .*line 2"),
      (dict(base=str(tmp_path)), r"config.base: .* is not a checkpoint directory"),
      (dict(adapters=str(tmp_path)), r"config.adapters: adapters\[0\]=.* does not fit"),
      (dict(adapters=world["adapters"]["geo"] + "," + world["adapters"]["geo"]),
       r"lists a directory twice"),
      (dict(weights=(1.0, 2.0)), r"config.weights: has 2 weights for 3 adapters"),
      (dict(base=""), r"config.base: is required"),
      (dict(methods=("lorahub",)), r"'lorahub' does not apply: it needs few-shot data"),
      (dict(methods=("genknowsub",)), r"needs general adapters \(config.general\)"),
      (dict(svd_rank=99), r"config.svd_rank: 99 exceeds"),
  ]
  for overrides, match in cases:
    workdir = tmp_path / "w"
    with pytest.raises(schema.ConfigError, match=match):
      _run_main(_config(world, **overrides), workdir)
    assert list(workdir.iterdir()) == [], overrides


def test_a_newly_registered_recycler_reaches_the_study():
  """The study's methods are the recycler registry's (less those needing gold labels)."""
  def build(res, opts):
    del opts
    return recyclers.Recycled(res.params)

  recyclers.register(recyclers.Recycler("mine_for_byo", build))
  try:
    assert "mine_for_byo" in study_lib.methods()
    assert "mine_for_byo" in study_lib.default_methods()
    study_lib.parse(ml_collections.ConfigDict({"methods": ("mine_for_byo",)}))
  finally:
    recyclers.unregister("mine_for_byo")
  assert "mine_for_byo" not in study_lib.methods()
  assert {"wudi", "genknowsub", "arrow", "lorahub", "similarity", "peft_ties"} <= set(
      study_lib.methods())
  assert "oracle" not in study_lib.methods()  # user questions have no gold adapter labels
  assert "ties" not in study_lib.default_methods()  # PEFT flavour by default


def test_export_of_a_router_is_refused_by_the_parser(world):
  with pytest.raises(schema.ConfigError, match=r"export='arrow' is a router.*does not produce a "
                     r"mergeable adapter; allowed: '' or one of \[.*'peft_linear'"):
    study_lib.parse(_config(world, export="arrow"))


@pytest.fixture(scope="module")
def other_adapters(world):
  """An adapter on other modules with another rank, and one of another model's shape."""
  root, base = world["root"], world["base"]
  other = _peft_adapter(base, root / "other", 4, dict(r=2, lora_alpha=4,
                                                       target_modules=["k_proj", "up_proj"]))
  tok = world["tok"]
  wide = root / "wide_base"
  torch.manual_seed(0)
  cfg = _llama_config(len(tok), tok)
  cfg.hidden_size = 48
  tr.LlamaForCausalLM(cfg).save_pretrained(wide)
  foreign = _peft_adapter(wide, root / "foreign", 5, dict(r=2, lora_alpha=4,
                                                         target_modules=["q_proj"]))
  return {"other": other, "foreign": foreign}


def test_adapters_of_another_model_are_refused_naming_the_directory(world, other_adapters):
  c = _config(world, adapters=world["adapters"]["geo"] + "," + other_adapters["foreign"])
  with pytest.raises(schema.ConfigError, match=r"adapters\[1\]=.*foreign.* does not fit "
                     r"config.base: .*wide_base"):
    study_lib.load_inputs(study_lib.parse(c))


def test_different_target_modules_say_which_methods_still_apply(world, other_adapters):
  c = _config(world, adapters=world["adapters"]["geo"] + "," + other_adapters["other"])
  inputs = study_lib.load_inputs(study_lib.parse(c))
  assert "arrow" in inputs.skipped and "arrow" not in inputs.methods
  # Zero padding leaves one rank per module (4 where geo adapts, 2 where other does), so
  # even the factor-wise types apply.
  assert {"peft_linear", "peft_ties", "peft_cat", "peft_svd", "peft_ties_svd", "wudi"} <= set(
      inputs.methods)
  with pytest.raises(schema.ConfigError, match=r"'arrow' does not apply: it needs adapters "
                     r"with the same target modules.*methods that apply to these adapters: "
                     r"\[.*'peft_linear', 'peft_ties'"):
    study_lib.load_inputs(study_lib.parse(_config(
        world, adapters=c.adapters, methods=("arrow",))))
  # Zero-padded modules are exactly PEFT's: the cat merge exports and loads with our logits.
  study = study_lib.parse(_config(world, adapters=c.adapters, export="peft_cat"))
  inputs = study_lib.load_inputs(study)
  adapter = study_lib.merged_adapter(study, inputs, "peft_cat")
  assert len(adapter) == 2 * 2 + 2 * 2  # q, down (geo) ∪ k, up (other) on 2 layers


def test_factorwise_methods_need_one_rank_per_module():
  flags = dict(same_paths=True, has_fewshot=True, general_fits=None, has_general=True)
  for m in ("peft_linear", "peft_ties", "peft_dare_ties", "peft_dare_linear",
            "peft_magnitude_prune", "uniform_factors", "lorahub"):
    assert "equal rank" in study_lib.why_not(m, same_ranks=False, **flags)
    assert study_lib.why_not(m, same_ranks=True, **flags) is None
  for m in ("peft_cat", "peft_svd", "peft_ties_svd", "wudi", "arrow", "similarity"):
    assert study_lib.why_not(m, same_ranks=False, **flags) is None


@pytest.mark.slow  # a subprocess per command (JAX start-up); see the in-process
# test_a_user_error_is_one_line_and_exit_status_2_for_every_study in test_reliability_config
def test_user_errors_exit_2_with_one_line_for_every_study(world, tmp_path):
  cases = [
      (["--config=configs/smoke.py", "--config.model.d_model=-3"], "model.d_model must be > 0"),
      (["--config=configs/merge_landscape.py", "--config.grid.steps=1"], "grid.steps"),
      (["--config=configs/recycle_peft.py", f"--config.base={world['base']}",
        f"--config.adapters={world['adapters']['geo']}", f"--config.eval={tmp_path}/no.jsonl"],
       "no.jsonl' is not a file; expected a JSONL file with one {\"prompt\": ..., \"answer\""),
      (["--config=configs/smoke.py", "--config.no_such_key=1"], "unknown config field"),
  ]
  for args, expected in cases:
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "experiments.run", f"--workdir={workdir}",
                           *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not workdir.exists()
  proc = subprocess.run([sys.executable, "-m", "experiments.run", f"--workdir={tmp_path}/w",
                         "--config=configs/smoke.py", "--config.model.d_model=-3",
                         "--traceback"], cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr


@pytest.mark.slow  # two loads and compilations of the base (~7 s)
def test_sharded_base_scores_like_the_unsharded_one(world):
  """shard=True places the base FSDP-style over the 4 fake CPU devices of conftest."""
  import jax
  assert len(jax.devices()) == 4
  scores = {}
  for shard in (False, True):
    study = study_lib.parse(_config(world, shard=shard, methods=("peft_ties",)))
    inputs = study_lib.load_inputs(study)
    if shard:
      kernel = tree_lib.flatten(inputs.params)["layers/0/attn/q_proj/kernel"]
      assert len(kernel.sharding.device_set) == 4
    models = study_lib.build_models(study, inputs)
    scores[shard] = [study_lib.score_model(study, inputs, m)["loglik"] for m in models]
  for a, b in zip(scores[False], scores[True]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ pre-flight


def test_preflight_predicts_the_evaluated_merges_and_reports_them(world, tmp_path):
  """The study runs the pre-flight before evaluating: each merge's and Arrow's predicted
  retention per adapter goes on its results record of all questions and into report.md, and
  it scores the very merge evaluated (DARE's drop masks included)."""
  from lora_limits import preflight as preflight_lib
  methods = ("peft_cat", "uniform_factors", "peft_dare_ties", "arrow", "similarity")
  config = _config(world, methods=methods, fewshot=world["fewshot"])
  _run_main(config, tmp_path / "w")
  workdir = tmp_path / "w"
  records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
  summary = {r["method"]: r.get("preflight") for r in records if r["group"] == "all"}
  assert all("preflight" not in r for r in records if r["group"] != "all")
  assert summary["base"] is None and summary["similarity"] is None  # not predicted
  for m in ("peft_cat", "uniform_factors", "peft_dare_ties", "arrow"):
    ret = summary[m]["retention"]
    assert set(ret) == set(ADAPTERS) and all(0.0 <= v <= 1.0 for v in ret.values()), m
    assert summary[m]["min_retention"] == min(ret.values())
    assert summary[m]["erases"] == sorted(a for a, v in ret.items() if v < 0.5)
  assert "routing_entropy" in summary["arrow"] and "capacity_ratio" in summary["peft_cat"]
  # The predictions are those of the adapters the study evaluated.
  study = study_lib.parse(config)
  inputs = study_lib.load_inputs(study)
  for m in ("peft_cat", "peft_dare_ties"):
    merged = merge_lib.MergeResult(m, "factors", adapter=study_lib.merged_adapter(study, inputs, m))
    want = preflight_lib.retention(inputs.adapters, merged, names=inputs.names)
    for r in want:
      assert summary[m]["retention"][r.adapter] == pytest.approx(r.retention, abs=1e-9), m
  # cat is exactly the sum of the updates; factor averaging (1/K on A and on B) loses more.
  assert min(summary["uniform_factors"]["retention"].values()) < min(
      summary["peft_cat"]["retention"].values())
  report = (workdir / "report.md").read_text()
  assert "## Pre-flight: predicted retention" in report
  for m in ("peft_cat", "uniform_factors", "peft_dare_ties", "arrow"):
    assert f"| {m} | {summary[m]['min_retention']:.2f} |" in report
  assert "Not predicted: `similarity`" in report
  assert json.loads((workdir / "preflight.json").read_text())["adapters"] == list(ADAPTERS)
  # preflight=False evaluates without it.
  _run_main(_config(world, methods=("peft_cat",), preflight=False), tmp_path / "off")
  records = [json.loads(line) for line in
             (tmp_path / "off" / "results.jsonl").read_text().splitlines()]
  assert not any("preflight" in r for r in records)
  assert "Not run: config.preflight=False" in (tmp_path / "off" / "report.md").read_text()
  assert not (tmp_path / "off" / "preflight.json").exists()


# -------------------------------------------------------------------- tokenizer without pad


@pytest.fixture(scope="module")
def base_without_pad(world):
  """The world's base with a tokenizer that has no pad token (as Llama's)."""
  import shutil
  base = world["root"] / "base_nopad"
  shutil.copytree(world["base"], base)
  tok = tr.AutoTokenizer.from_pretrained(base)
  tok.pad_token = None
  tok.save_pretrained(base)
  assert tr.AutoTokenizer.from_pretrained(base).pad_token_id is None
  return str(base)


def test_lorahub_and_similarity_pad_with_eos_when_the_tokenizer_has_no_pad(world,
                                                                           base_without_pad):
  """Rows pad with EOS when the tokenizer has no pad token; padding is never attended to nor
  scored, so LoraHub's search, similarity routing and every score are the same as with a
  pad token (any pad-dependence, or a None pad, would show here)."""
  got = {}
  for base in (world["base"], base_without_pad):
    study = study_lib.parse(_config(world, base=base, fewshot=world["fewshot"],
                                     methods=("lorahub", "similarity")))
    inputs = study_lib.load_inputs(study)
    got[base] = (inputs, {m.name: (m.extra, study_lib.score_model(study, inputs, m))
                          for m in study_lib.build_models(study, inputs)})
  (with_pad, scored), (without, scored_nopad) = got[world["base"]], got[base_without_pad]
  tok = world["tok"]
  assert with_pad.pad_id == tok.pad_token_id and without.pad_id == tok.eos_token_id
  assert with_pad.pad_id != without.pad_id
  padded = with_pad.eval_rows["tokens"] == with_pad.pad_id
  assert padded.any()  # the questions differ in length, so rows are padded
  assert (without.eval_rows["tokens"][padded] == tok.eos_token_id).all()
  assert scored.keys() == scored_nopad.keys() and {"lorahub", "similarity"} <= scored.keys()
  for name in scored:
    extra, scores = scored[name]
    extra_nopad, scores_nopad = scored_nopad[name]
    assert extra == extra_nopad, name  # LoraHub's weights found on the few-shot rows
    np.testing.assert_array_equal(scores["exact"], scores_nopad["exact"], err_msg=name)
    np.testing.assert_allclose(scores["loglik"], scores_nopad["loglik"], rtol=0, atol=1e-5,
                               err_msg=name)
