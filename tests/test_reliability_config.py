"""Every field of every shipped config (and variant), walked with bad values.

For each leaf of each `configs/*.py` config: a value of the wrong type must be refused, and
an out-of-range value must be refused unless the field is listed in `ANY_VALUE_OK` with the
reason; an unknown key at every level must be refused. A refusal is one `ValueError`
(`schema.ConfigError` from the studies' parsers) whose message names the field, raised by
the parser, i.e. before any compute; `test_study_main_refuses_before_writing_anything`
checks that each study's `main` validates before it writes a file, and
`test_command_line_override_is_refused_before_compute` the same through
`python -m experiments.run`.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pathlib
import re
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
import pytest

import reliability_smoke as smoke
from experiments import run as run_lib, schema
from experiments.studies import recycling
from experiments.studies import data as data_study
from experiments.studies import merge_landscape as landscape_study
from experiments.studies import theory as theory_study

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"

PARSERS = {
    "recycling": recycling.parse,
    "data": lambda c: schema.build(data_study.DataStudy, c, "config"),
    "merge_landscape": lambda c: schema.build(landscape_study.LandscapeStudy, c, "config"),
    "theory": lambda c: schema.build(theory_study.TheoryStudy, c, "config"),
}

# (study, dotted field) whose every value of the right type is valid, and why.
ANY_VALUE_OK = {
    ("*", "study"): "chosen by the entry point, which refuses an unknown study "
                    "(test_unknown_study_is_refused_by_the_entry_point)",
    ("recycling", "cache_dir"): "any directory path",
    ("recycling", "model.hf_path"): "a path (existence: see test_known_gaps)",
    ("recycling", "adapters.targets"): "any regex (matching a kernel: see test_known_gaps)",
    ("recycling", "recycle.methods"): "() runs the controls only (base and single adapters)",
    ("data", "math.items"): "any distinct lower-case words",
    ("data", "math.people"): "any distinct lower-case words",
    ("merge_landscape", "grid.low"): "the weight grid may start below zero (default -1)",
    ("theory", "multi_fact.ranks"): "() means every rank 1..n_facts",
    ("preflight", "source"): "a workdir path (read when mode='workdir' runs)",
    ("preflight", "hf_path"): "a checkpoint path (read when mode='hf' runs)",
    ("preflight", "peft_dirs"): "adapter paths (read when mode='hf' runs)",
    ("recycle_peft", "base"): "a path, read and checked by load_inputs before any compute "
                              "(tests/test_recycle_peft.py)",
    ("recycle_peft", "adapters"): "paths, read and checked by load_inputs before any compute",
    ("recycle_peft", "eval"): "a path, read and checked by load_inputs before any compute",
    ("recycle_peft", "fewshot"): "a path, read and checked by load_inputs before any compute",
    ("recycle_peft", "general"): "paths, read and checked by load_inputs before any compute",
}


def parser_for(study: str):
  """The study's parser: PARSERS, else the study module's own `parse` (e.g. 'sweep')."""
  if study in PARSERS:
    return PARSERS[study]
  module = importlib.import_module(f"experiments.studies.{study}")
  if not hasattr(module, "parse"):
    pytest.fail(f"study {study!r} has no parse(); add its parser to PARSERS in this test")
  return module.parse


def _variants(path: pathlib.Path, get_config) -> list[str]:
  """'' and every variant: those the file compares against, and those the error for an
  unknown variant lists (configs that delegate to a helper, e.g. configs/_sweep.py)."""
  found = set(re.findall(r'variant == "(\w+)"', path.read_text()))
  try:
    get_config("no_such_variant")
  except ValueError as e:
    listed = re.split(r"allowed|available", str(e), maxsplit=1)
    if len(listed) == 2:
      found |= set(re.findall(r"'(\w+)'", listed[1]))
  else:
    raise AssertionError(f"{path.name}: get_config accepted an unknown variant")
  return [""] + sorted(found)


def shipped_configs() -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  for path in sorted(CONFIG_DIR.glob("*.py")):
    if path.name.startswith("_"):  # __init__ and shared helpers, not configs
      continue
    module = importlib.import_module(f"configs.{path.stem}")
    takes_variant = bool(inspect.signature(module.get_config).parameters)
    for variant in _variants(path, module.get_config) if takes_variant else [""]:
      config = module.get_config(variant) if takes_variant else module.get_config()
      yield f"{path.stem}:{variant}" if variant else path.stem, config


CONFIGS = dict(shipped_configs())


def leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def mappings(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
  """Dotted paths of every mapping in the tree ('' for the root)."""
  yield prefix.rstrip(".")
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from mappings(value, f"{prefix}{key}.")


def bad_values(value: Any) -> dict[str, list[Any]]:
  """{'type': values of another type, 'range': values of the right type out of any sane range}."""
  if isinstance(value, bool):
    return {"type": ["yes", 1, None], "range": []}
  if isinstance(value, int):
    return {"type": ["3", 1.5, None, True], "range": [-1, -(2**40)]}
  if isinstance(value, float):
    return {"type": ["0.5", None, True], "range": [-1.0, float("nan"), float("inf")]}
  if isinstance(value, str):
    return {"type": [7, None, ("a",)], "range": ["no_such_value"]}
  if isinstance(value, tuple):
    if not value:  # element type unknown from the value
      return {"type": [7, "x"], "range": []}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
      return {"type": [7, "1", ("1",)], "range": [(), (-1,) + value]}
    return {"type": [7, "x", (7,)], "range": [(), ("no_such_value",) + value]}
  raise AssertionError(f"a config leaf of unexpected type {type(value).__name__}: {value!r}")


def with_value(tree: dict, dotted: str, value: Any) -> dict:
  out = copy.deepcopy(tree)
  node = out
  *parents, leaf = dotted.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  return out


def _allowed(study: str, field: str) -> bool:
  if study == "sweep" and field.startswith("base."):  # a recycling config swept over a field
    return _allowed("recycling", field.removeprefix("base."))
  return (study, field) in ANY_VALUE_OK or ("*", field) in ANY_VALUE_OK


def _ignored(config: ml_collections.ConfigDict, field: str) -> bool:
  """A sweep replaces its swept field's value in `base` by each of `sweep.values`."""
  return config.study == "sweep" and field == f"base.{config.sweep.field}"


def _cases() -> Iterator[tuple[str, str, str, Any]]:
  for name, config in CONFIGS.items():
    for field, value in leaves(config.to_dict()):
      if _ignored(config, field):
        continue
      for kind, values in bad_values(value).items():
        for bad in values:
          if kind == "range" and _allowed(config.study, field):
            continue
          yield name, field, kind, bad


def test_every_study_and_config_is_covered():
  for study in run_lib.available_studies():
    assert callable(parser_for(study))
  assert set(PARSERS) <= set(run_lib.available_studies())
  # Every config file, and each of its variants, is walked.
  assert {n.split(":")[0] for n in CONFIGS} == {
      p.stem for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_")}
  assert {"two_hop:quick", "math:no_domain", "math:quick", "merge_landscape:simplex3"} <= set(
      CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_config_parses(name):
  config = CONFIGS[name]
  parser_for(config.study)(config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_refuses_bad_values(name):
  """One test per config (the cases run in a loop: ~1,000 parses in all)."""
  config = CONFIGS[name]
  parse, base = parser_for(config.study), config.to_dict()
  failures, checked = [], 0
  for case_name, field, kind, bad in _cases():
    if case_name != name:
      continue
    checked += 1
    try:
      parse(with_value(base, field, bad))
    except ValueError as e:
      names = {field.split(".")[-1]}
      if config.study == "sweep" and field == "sweep.values":  # named as the swept field
        names.add(config.sweep.field)
      if not any(n in str(e) for n in names):
        failures.append(f"{field}={bad!r} ({kind}): message does not name the field: {e}")
      if not isinstance(e, schema.ConfigError):  # experiments.run reports ConfigErrors only
        failures.append(f"{field}={bad!r} ({kind}): a {type(e).__name__}, not a ConfigError")
    except Exception as e:  # noqa: BLE001 - anything but a ValueError is a failure here
      failures.append(f"{field}={bad!r} ({kind}): {type(e).__name__}: {e}")
    else:
      failures.append(f"{field}={bad!r} ({kind}) was accepted")
  assert checked > 20
  assert failures == []


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unknown_key_at_every_level_is_refused(name):
  config = CONFIGS[name]
  parse, base = parser_for(config.study), config.to_dict()
  for where in mappings(base):
    bad = with_value(base, f"{where}.no_such_key" if where else "no_such_key", 1)
    with pytest.raises(schema.ConfigError, match="no_such_key"):
      parse(bad)


def test_wrong_types_name_the_field_and_the_value():
  config = CONFIGS["smoke"].to_dict()
  cases = {"pretrain.steps": "many", "adapters.alpha": "big", "recycle.libraries": 7,
           "model.tie_embeddings": 1, "seeds": (0.5,), "world.pool_size": "4"}
  for field, bad in cases.items():
    with pytest.raises(schema.ConfigError) as info:
      recycling.parse(with_value(config, field, bad))
    assert field.split(".")[-1] in str(info.value) and repr(bad).strip("(),") in str(info.value)


@pytest.mark.parametrize("field,bad,match", [
    ("adapters.rank", 0, r"rank must be > 0|rank must be a positive int"),
    ("recycle.options.ties.density", 1.5, r"recycle.options.ties: density=1.5 must be a number in \(0, 1\]"),
    ("recycle.options.dare_ties.density", 0.0, r"recycle.options.dare_ties: density=0.0 must be a number in \(0, 1\]"),
    ("recycle.options.arrow.top_k", 3, r"arrow.top_k must be <= 2"),
    ("recycle.options.similarity.top_k", 3, r"similarity.top_k must be <= 2"),
    ("seeds", (-1,), r"seeds must be >= 0"),
    ("pretrain.steps", -5, r"pretrain.steps must be > 0"),
    ("world.test_chains", -1, r"test_chains"),
    ("world.tiers", ("F", "Q"), r"tiers='Q' is not one of"),
    ("recycle.methods", ("sum", "magic"), r"recycle.methods has 'magic'"),
    ("task", "poetry", r"task='poetry' is not one of"),
    ("recycle.options.knots.inner", "nope", r"knots: inner='nope' is not one of"),
    ("pretrain.learning_rate", float("nan"), r"pretrain.learning_rate must be a finite number"),
])
def test_the_issue_examples(field, bad, match):
  """rank <= 0, density outside (0, 1], top-k > K, negative seeds or counts, unknown tier,
  method, task."""
  with pytest.raises(schema.ConfigError, match=match):
    recycling.parse(with_value(CONFIGS["smoke"].to_dict(), field, bad))


@pytest.mark.parametrize("field,bad", [
    ("adapters.rank", 64),  # > d_model = 32: lora.init fails after pretraining
    ("adapters.targets", "no_such_kernel$"),  # matches no kernel: fails after pretraining
    ("model.hf_path", "/no/such/checkpoint"),  # fails when the base is loaded
])
def test_model_dependent_fields_are_checked_before_compute(field, bad):
  with pytest.raises(schema.ConfigError, match=field.split(".")[-1]):
    recycling.parse(with_value(CONFIGS["smoke"].to_dict(), field, bad))


@pytest.mark.parametrize("study", run_lib.available_studies())
def test_study_main_refuses_before_writing_anything(study, tmp_path):
  name = next(n for n, c in CONFIGS.items() if c.study == study)
  config = CONFIGS[name].to_dict()
  field, value = next((f, v) for f, v in leaves(config) if f != "study")
  module = importlib.import_module(f"experiments.studies.{study}")
  workdir = tmp_path / "work"
  workdir.mkdir()
  # A ConfigError (not only a ValueError): what experiments.run reports in one line, exit 2.
  with pytest.raises(schema.ConfigError, match=field.split(".")[-1]):
    module.main(with_value(config, field, bad_values(value)["type"][0]), workdir)
  assert list(workdir.iterdir()) == []


def test_unknown_study_is_refused_by_the_entry_point(tmp_path):
  proc = subprocess.run(
      smoke.command(tmp_path / "w", "--config.study=nope"), cwd=smoke.REPO,
      env=smoke.environment(), capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "config.study='nope' is not one of" in proc.stderr


def test_command_line_override_is_refused_before_compute(tmp_path):
  proc = subprocess.run(
      smoke.command(tmp_path / "w", "--config.recycle.options.ties.density=0.0"), cwd=smoke.REPO,
      env=smoke.environment(), capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "recycle.options.ties: density=0.0 must be a number in (0, 1]" in proc.stderr
  assert "stage" not in proc.stderr  # no stage started
  assert not (tmp_path / "w" / "cache").exists()


def _first_int_field(config: ml_collections.ConfigDict) -> str:
  """The first int field of `config` whose negative values are refused."""
  return next(f for f, v in leaves(config.to_dict()) if isinstance(v, int)
              and not isinstance(v, bool) and not _allowed(config.study, f)
              and not _ignored(config, f))


STUDY_CONFIGS = {c.study: n for n, c in reversed(list(CONFIGS.items()))}  # first per study


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags
@pytest.mark.parametrize("study", run_lib.available_studies())
def test_a_user_error_is_one_line_and_exit_status_2_for_every_study(study, tmp_path, capsys):
  """In process (no JAX start-up of a subprocess): `experiments.run` with a bad field of each
  study prints `error: ...` naming the field, exits 2 and leaves no workdir behind."""
  name = STUDY_CONFIGS[study]
  path, _, variant = name.partition(":")
  field = _first_int_field(CONFIGS[name])
  workdir = tmp_path / "w"
  argv = ["run", f"--config={CONFIG_DIR / path}.py" + (f":{variant}" if variant else ""),
          f"--workdir={workdir}", f"--config.{field}=-1"]
  line = _one_line_user_error(argv, capsys)
  assert field.split(".")[-1] in line, line
  assert not workdir.exists()


def _one_line_user_error(argv: list[str], capsys) -> str:
  """Runs `experiments.run` in process; asserts exit status 2 and one `error: ` line."""
  from absl import flags
  try:
    with pytest.raises(SystemExit) as info:
      run_lib.main(run_lib.parse_flags(argv))
  finally:
    flags.FLAGS.unparse_flags()
  lines = capsys.readouterr().err.strip().splitlines()
  assert info.value.code == run_lib.USER_ERROR_STATUS, lines
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags
@pytest.mark.parametrize("config,override,expected", [
    ("preflight.py", "--config.model.d_model=-3",  # a field of other studies' configs
     "unknown config field config.model (--config.model.d_model); config has the fields ["),
    ("smoke.py", "--config.model.no_such=1", "config.model has the fields ['d_ff', 'd_model'"),
    ("smoke.py", "--config.seeds.x=1", "config.seeds is a value, not a section"),
])
def test_overrides_of_no_field_are_one_line_listing_the_fields_there(
    config, override, expected, tmp_path, capsys):
  workdir = tmp_path / "w"
  argv = ["run", f"--config={CONFIG_DIR / config}", f"--workdir={workdir}", override]
  line = _one_line_user_error(argv, capsys)
  assert expected in line, line
  assert "\\" not in line  # not the escaped repr of ml_collections' KeyError
  assert not workdir.exists()
