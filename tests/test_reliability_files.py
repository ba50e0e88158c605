"""Damaged files are refused with an error naming the file, never loaded as garbage.

Covers orbax checkpoint steps (truncated, deleted or flipped shards and metadata, a step
directory a killed save left half-written), JSON-lines results and units (truncated, not
UTF-8, not records, stale temporary files), Hugging Face safetensors checkpoints (single and
sharded), PEFT adapter directories and tokenizer directories; then the same faults through
the paper pipeline on a copy of the smoke run's workdir; and fuzzed loader inputs
(hypothesis): arbitrary bytes as JSON lines or safetensors, arbitrary JSON values in
config.json / adapter_config.json fields — each loads or raises ValueError, nothing else.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings
from hypothesis import strategies as st

import reliability_smoke as smoke
from configs import smoke as smoke_config
from experiments import common, schema
from experiments.studies import data as data_study
from experiments.studies import recycling
from experiments.studies.recycling import report
from lora_limits import checkpoint as ckpt_lib
from lora_limits import lora as lora_lib
from lora_limits import tokenizer as tok_lib
from lora_limits.interop import hf, peft
from lora_limits.models import transformer

# The smoke reference run (`reliability_smoke.reference_run`) is made once per worker.
pytestmark = pytest.mark.xdist_group("smoke_reference")


def _truncate(path: pathlib.Path, keep: float = 0.5) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


def _truncate_mid_line(path: pathlib.Path) -> None:
  data = path.read_bytes()
  cut = len(data) // 2
  while data[cut - 1:cut] == b"\n":
    cut -= 1
  path.write_bytes(data[:cut])


def _flip(path: pathlib.Path, at: int | None = None) -> None:
  data = bytearray(path.read_bytes())
  i = len(data) // 2 if at is None else at
  data[i] ^= 0xFF
  path.write_bytes(bytes(data))


# ----------------------------------------------------------------------- orbax checkpoints

STATE = {"w": jnp.arange(600, dtype=jnp.float32).reshape(6, 100), "b": jnp.ones(5),
         "step": jnp.int32(8)}


def _saved(tmp_path) -> pathlib.Path:
  directory = tmp_path / "ckpt"
  ck = ckpt_lib.Checkpointer(directory)
  ck.save(4, jax.tree.map(lambda x: x - 1, STATE), {"data_position": 4})
  ck.save(8, STATE, {"data_position": 8})
  ck.close()
  return directory


def _files(step_dir: pathlib.Path, part: str) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and part in str(
      p.relative_to(step_dir)))


def _restore(directory: pathlib.Path):
  ck = ckpt_lib.Checkpointer(directory)
  try:
    return ck.latest_step(), *ck.restore(ck.latest_step(), STATE)
  finally:
    ck.close()


DAMAGE = {
    "data shards truncated": lambda d: [_truncate(p) for p in _files(d, "ocdbt.process_0/d/")],
    "data shards deleted": lambda d: [p.unlink() for p in _files(d, "ocdbt.process_0/d/")],
    "a byte flipped in every data shard": lambda d: [_flip(p) for p in
                                                     _files(d, "ocdbt.process_0/d/")],
    "manifest truncated": lambda d: [_truncate(p) for p in _files(d, "manifest.ocdbt")],
    "array metadata truncated": lambda d: [_truncate(p) for p in _files(d, "state/_METADATA")],
    "record deleted": lambda d: [p.unlink() for p in _files(d, "record/metadata")],
    "record truncated": lambda d: [_truncate(p) for p in _files(d, "record/metadata")],
    "state directory deleted": lambda d: shutil.rmtree(d / "state"),
    "step directory emptied": lambda d: [shutil.rmtree(d), d.mkdir()],
}


def _named_file_error(directory: pathlib.Path) -> str:
  return (rf"checkpoint step 8 in {directory} cannot be restored: file {directory}/8/\S+ "
          r"(is missing|was altered or truncated since it was saved).*delete that step directory")


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_step_is_refused_naming_the_file(damage, tmp_path):
  directory = _saved(tmp_path)
  DAMAGE[damage](directory / "8")
  with pytest.raises(ckpt_lib.CheckpointError, match=_named_file_error(directory)):
    _restore(directory)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_refused_without_the_file_list_too(damage, tmp_path):
  """The second line of defence (a step saved before file lists existed, or a lost list):
  orbax's own failure, or the recorded state digest, still refuses it."""
  directory = _saved(tmp_path)
  (directory / "file_sha256" / "8.json").unlink()
  DAMAGE[damage](directory / "8")
  with pytest.raises(ckpt_lib.CheckpointError, match=(
      rf"checkpoint step 8 in {directory} (cannot be restored|restores to different values)"
      r".*delete that step directory")):
    _restore(directory)


@pytest.mark.parametrize("file_list", [True, False])
def test_no_single_byte_flip_restores_wrong_values(tmp_path, file_list):
  """Flip one byte in each file of the step in turn. With the file list every flip is
  refused by name; without it the restore fails or returns exactly what was saved (a byte
  that no restore reads)."""
  directory = _saved(tmp_path)
  if not file_list:
    shutil.rmtree(directory / "file_sha256")
  files = [p.relative_to(directory) for p in _files(directory / "8", "")]
  assert len(files) > 8
  outcomes = {}
  for i, rel in enumerate(files):
    copy = tmp_path / f"flip-{i}"
    shutil.copytree(directory, copy)
    _flip(copy / rel)
    try:
      step, state, record = _restore(copy)
    except ckpt_lib.CheckpointError as e:
      outcomes[str(rel)] = "refused"
      if file_list:
        assert str(copy / rel) in str(e)
      continue
    assert step == 8 and record == {"data_position": 8}, rel
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(STATE)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(rel))
    outcomes[str(rel)] = "intact"
  if file_list:
    assert set(outcomes.values()) == {"refused"}
  else:
    assert "refused" in outcomes.values()


def test_value_digest_catches_what_reads_without_error(tmp_path):
  directory = _saved(tmp_path)
  (directory / "file_sha256" / "8.json").unlink()
  for p in _files(directory / "8", "ocdbt.process_0/d/"):
    _flip(p)
  with pytest.raises(ckpt_lib.CheckpointError, match="restores to different values than were "
                                                     "saved"):
    _restore(directory)


def test_damaged_file_list_is_named(tmp_path):
  directory = _saved(tmp_path)
  _truncate(directory / "file_sha256" / "8.json")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"its file list .*8.json is damaged"):
    _restore(directory)
  assert sorted(p.name for p in (directory / "file_sha256").iterdir()) == ["4.json", "8.json"]


def test_half_written_step_from_a_killed_save_is_ignored_and_removed(tmp_path):
  directory = _saved(tmp_path)
  partial = directory / "12.orbax-checkpoint-tmp-1700000000"
  shutil.copytree(directory / "8", partial)
  _truncate(_files(partial, "ocdbt.process_0/d/")[0])
  step, state, _ = _restore(directory)
  assert step == 8 and not partial.exists()
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(STATE["w"]))


def test_earlier_step_still_restores_after_the_damaged_one_is_deleted(tmp_path):
  """The documented recovery: delete the damaged step directory, resume from the previous."""
  directory = _saved(tmp_path)
  DAMAGE["data shards truncated"](directory / "8")
  with pytest.raises(ckpt_lib.CheckpointError):
    _restore(directory)
  shutil.rmtree(directory / "8")
  step, state, record = _restore(directory)
  assert step == 4 and record == {"data_position": 4}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(STATE["w"]) - 1)


# ------------------------------------------------------------------------- JSON lines

RECORDS = [{"task": "two_hop", "accuracy": 0.5, "n": 4}, {"task": "math", "accuracy": 1.0}]


def test_jsonl_round_trip_and_truncation_is_named(tmp_path):
  path = tmp_path / "units" / "two_hop-seed0.jsonl"
  common.write_jsonl(path, RECORDS)
  assert common.read_jsonl(path) == RECORDS
  data = path.read_bytes()
  for cut in range(1, len(data) - 1):
    if b"\n" in (data[cut - 1:cut], data[cut:cut + 1]):
      continue  # a cut at a line boundary leaves valid lines: see test_truncated_unit_file...
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=rf"{path}: line \d is not valid JSON.*truncated"):
      common.read_jsonl(path)


@pytest.mark.parametrize("content,match", [
    (b'{"a": 1}\n[1, 2]\n', r"line 2 is a JSON list, not a record"),
    (b'{"a": 1}\n"text"\n', r"line 2 is a JSON str, not a record"),
    (b'\xff\xfe{"a": 1}\n', r"not UTF-8 text"),
    (b'{"a": 1}\n{"a": 2\n{"a": 3}\n', r"line 2 is not valid JSON"),
])
def test_jsonl_damage_is_named(content, match, tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=rf"{path}: .*{match}"):
    common.read_jsonl(path)


def test_stale_temporary_files_are_removed_and_never_read(tmp_path):
  path = tmp_path / "results.jsonl"
  stale = tmp_path / ".results.jsonl.k1ll3d.tmp"
  stale.write_text('{"half": ')
  other = tmp_path / ".report.md.x.tmp"
  other.write_text("another file's")
  common.write_jsonl(path, RECORDS)
  assert common.read_jsonl(path) == RECORDS
  assert not stale.exists() and other.exists()


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "report.md"
  common.atomic_write_text(path, "old\n")

  with pytest.raises(TypeError):  # fails inside the write, after the temporary file exists
    common.atomic_write_bytes(path, "not bytes")
  assert path.read_text() == "old\n"
  assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_report_refuses_damaged_results(tmp_path):
  (tmp_path / "results.jsonl").write_text('{"task": "two_hop", "tier": "F"\n')
  with pytest.raises(ValueError, match=r"results.jsonl: line 1 is not valid JSON"):
    report.write_report(tmp_path)
  assert not (tmp_path / "report.md").exists()


def test_data_study_split_loader_refuses_truncation(tmp_path):
  path = tmp_path / "hop1.jsonl"
  common.write_jsonl(path, [{"prompt": "a", "answer": "b", "meta": {}}] * 2)
  _truncate(path, 0.7)
  with pytest.raises(ValueError, match=rf"{path}: line 2"):
    data_study.load_split(path)


# ----------------------------------------------------- Hugging Face, PEFT, tokenizer files


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A tiny Llama checkpoint (single file and sharded), a PEFT adapter and a tokenizer."""
  root = tmp_path_factory.mktemp("exported")
  tok = tok_lib.build(["a b c d e f g h"])
  cfg = transformer.ModelConfig(vocab_size=len(tok), d_model=16, n_layers=1, n_heads=2,
                                d_ff=32, tie_embeddings=False)
  params = transformer.init(jax.random.key(0), cfg)
  hf.export_checkpoint(params, cfg, root / "single", arch="llama", tokenizer=tok)
  hf.export_checkpoint(params, cfg, root / "sharded", arch="llama", tokenizer=tok,
                       max_shard_bytes=4000)
  adapter = lora_lib.init(jax.random.key(1), params, lora_lib.LoraConfig(rank=2))
  peft.save_adapter(adapter, root / "peft")
  tok.save_pretrained(str(root / "tokenizer"))
  return _Exported(root, params)


class _Exported(tuple):
  """(root, params) with a short repr (hypothesis prints its arguments on failure)."""

  def __new__(cls, root, params):
    return super().__new__(cls, (root, params))

  def __repr__(self):
    return f"exported({self[0]})"


def _variant(root: pathlib.Path, src: str, name: str) -> pathlib.Path:
  out = root / name
  shutil.copytree(root / src, out)
  return out


def test_exported_files_load_before_damage(exported):
  root, params = exported
  for name in ("single", "sharded"):
    _, loaded, tok = hf.load_checkpoint(root / name)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, params))
  assert len(list((root / "sharded").glob("model-*.safetensors"))) > 2
  assert peft.load_adapter(root / "peft", params)
  assert tok_lib.load(str(root / "tokenizer")).pad_token_id == 0


@pytest.mark.parametrize("src,damage,file,match", [
    ("single", "truncate", "model.safetensors", r"safetensors file .*model.safetensors' cannot "
                                                r"be read .*truncated or corrupt"),
    ("single", "flip_header", "model.safetensors", r"model.safetensors' cannot be read"),
    ("single", "delete", "model.safetensors", r"has no \*.safetensors files"),
    ("single", "truncate", "config.json", r"config.json' is not a readable JSON file"),
    ("single", "truncate", "tokenizer.json", r"tokenizer.json' is not a readable JSON file"),
    ("single", "delete", "tokenizer.json", r"the tokenizer files in .* cannot be loaded"),
    ("sharded", "truncate", "model-00002-of-*.safetensors", r"model-00002-of-\d+.safetensors' "
                                                            r"cannot be read"),
    ("sharded", "delete", "model-00002-of-*.safetensors", r"the index names "
                                                          r"'model-00002-of-\d+.safetensors'"),
    ("sharded", "truncate", "model.safetensors.index.json", r"index.json' is not a readable JSON"),
])
def test_damaged_hf_checkpoint_is_refused_with_its_name(exported, src, damage, file, match):
  root, _ = exported
  d = _variant(root, src, f"{src}-{damage}-{file.replace('*', '')}")
  target = next(d.glob(file))
  {"truncate": _truncate, "delete": pathlib.Path.unlink,
   "flip_header": lambda p: _flip(p, at=20)}[damage](target)
  with pytest.raises(ValueError, match=match):
    hf.load_checkpoint(d)


@pytest.mark.parametrize("damage,file,match", [
    ("truncate", "adapter_model.safetensors", r"adapter_model.safetensors' cannot be read"),
    ("delete", "adapter_model.safetensors", r"has no adapter_model.safetensors"),
    ("truncate", "adapter_config.json", r"adapter_config.json' is not a readable JSON file"),
    ("delete", "adapter_config.json", r"has no adapter_config.json"),
])
def test_damaged_peft_adapter_is_refused_with_its_name(exported, damage, file, match):
  root, params = exported
  d = _variant(root, "peft", f"peft-{damage}-{file}")
  (_truncate if damage == "truncate" else pathlib.Path.unlink)(d / file)
  with pytest.raises(ValueError, match=match):
    peft.load_adapter(d, params)


@pytest.mark.parametrize("damage,file,match", [
    ("truncate", "tokenizer.json", r"tokenizer.json' is not a readable JSON file"),
    ("delete", "tokenizer.json", r"lacks tokenizer.json"),
    ("truncate", "tokenizer_config.json", r"tokenizer_config.json' is not a readable JSON"),
    ("delete", "tokenizer_config.json", r"lacks tokenizer_config.json"),
])
def test_damaged_tokenizer_is_refused_with_its_name(exported, damage, file, match):
  root, _ = exported
  d = _variant(root, "tokenizer", f"tok-{damage}-{file}")
  (_truncate if damage == "truncate" else pathlib.Path.unlink)(d / file)
  with pytest.raises(ValueError, match=match):
    tok_lib.load(str(d))


def test_tokenizer_with_foreign_special_tokens_is_refused(exported):
  root, _ = exported
  d = _variant(root, "tokenizer", "tok-foreign")
  config = json.loads((d / "tokenizer_config.json").read_text())
  config["pad_token"] = "a"
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"has special tokens .*expected"):
    tok_lib.load(str(d))
  with pytest.raises(ValueError, match=r"tokenizer directory .*nowhere' does not exist"):
    tok_lib.load(str(root / "nowhere"))


# ------------------------------------------------------------------ through the pipeline


@pytest.fixture()
def smoke_copy(tmp_path_factory, tmp_path):
  """A copy of the reference smoke run's workdir, and its parsed config."""
  reference = smoke.reference_run(tmp_path_factory.getbasetemp())
  workdir = tmp_path / "work"
  shutil.copytree(reference, workdir)
  cfg = recycling.parse(smoke_config.get_config())
  assert json.loads((reference / "config.json").read_text()) == schema.to_dict(cfg)
  return workdir, cfg


def test_pipeline_refuses_a_damaged_cached_base(smoke_copy):
  workdir, cfg = smoke_copy
  (workdir / "units" / "two_hop-seed0.jsonl").unlink()
  (workdir / "results.jsonl").unlink()
  step_dir = next(workdir.glob("cache/base/*/ckpt/40"))
  for p in _files(step_dir, "ocdbt.process_0/d/"):
    _flip(p)
  with pytest.raises(ckpt_lib.CheckpointError, match=(
      rf"checkpoint step 40 in {step_dir.parent} cannot be restored: file {step_dir}/state/\S+ "
      r"was altered")):
    recycling.run(cfg, workdir)
  assert not (workdir / "results.jsonl").exists()


def test_pipeline_refuses_a_half_written_unit(smoke_copy):
  workdir, cfg = smoke_copy
  unit = workdir / "units" / "two_hop-seed0.jsonl"
  before = (workdir / "results.jsonl").read_bytes()
  _truncate_mid_line(unit)
  with pytest.raises(ValueError, match=rf"{unit} does not match its SHA-256"):
    recycling.run(cfg, workdir)
  assert (workdir / "results.jsonl").read_bytes() == before


def test_base_json_lost_after_the_final_checkpoint_is_rebuilt_without_training(smoke_copy):
  """A kill between the base's last checkpoint and base.json: the rerun restores the
  checkpoint, trains no step and writes the same base.json (but for its wall-clock field)."""
  workdir, cfg = smoke_copy
  info_path = next(workdir.glob("cache/base/*/base.json"))
  metrics = info_path.parent / "metrics.jsonl"
  before, history = json.loads(info_path.read_text()), metrics.read_bytes()
  info_path.unlink()
  tokenizer = tok_lib.load(str(workdir / "tokenizer"))
  world = recycling.config.build_world(cfg, 0)
  base = recycling.stages.pretrained_base(cfg, world, tokenizer, workdir / "cache", 0)
  after = json.loads(info_path.read_text())
  assert metrics.read_bytes() == history
  before.pop("train_seconds")
  after.pop("train_seconds")
  assert after == before and base.info["recall_exact_match"] == before["recall_exact_match"]


def test_truncated_unit_file_at_a_line_boundary_is_not_trusted(smoke_copy):
  workdir, cfg = smoke_copy
  unit = workdir / "units" / "two_hop-seed0.jsonl"
  lines = unit.read_text().splitlines(keepends=True)
  unit.write_text("".join(lines[:len(lines) // 2]))
  with pytest.raises(ValueError, match=str(unit)):
    recycling.run(cfg, workdir)


# ------------------------------------------------------------------- fuzzed loader inputs

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6)
_FUZZ = hyp_settings(max_examples=40, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(st.binary(max_size=300))
def test_fuzzed_jsonl_bytes_give_records_or_a_named_error(tmp_path, data):
  path = tmp_path / "fuzz.jsonl"
  path.write_bytes(data)
  try:
    records = common.read_jsonl(path)
  except ValueError as e:
    assert str(path) in str(e)
  else:
    assert all(isinstance(r, dict) for r in records)


@_FUZZ
@given(st.binary(max_size=200), st.booleans())
def test_fuzzed_safetensors_bytes_are_refused_by_name(exported, tmp_path, data, keep_header):
  root, _ = exported
  d = tmp_path / "ck"
  shutil.rmtree(d, ignore_errors=True)
  shutil.copytree(root / "single", d)
  original = (d / "model.safetensors").read_bytes()
  # Either random bytes, or the real header with random bytes where the tensors were.
  header = 8 + int.from_bytes(original[:8], "little")
  (d / "model.safetensors").write_bytes(original[:header] + data if keep_header else data)
  with pytest.raises(ValueError, match=r"model.safetensors"):
    hf.load_checkpoint(d, tokenizer=False)


def _fuzzed_json_file(path: pathlib.Path, field: str, value: Any) -> None:
  obj = json.loads(path.read_text())
  obj[field] = value
  path.write_text(json.dumps(obj))


PEFT_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
               "use_rslora", "peft_type", "bias", "init_lora_weights", "use_dora",
               "fan_in_fan_out", "task_type")
HF_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
             "num_key_value_heads", "num_hidden_layers", "vocab_size", "rms_norm_eps",
             "rope_theta", "rope_scaling", "hidden_act", "tie_word_embeddings", "head_dim",
             "attention_bias", "mlp_bias", "max_position_embeddings", "torch_dtype")


@_FUZZ
@given(st.sampled_from(PEFT_FIELDS), _JSON)
def test_fuzzed_peft_config_fields_load_or_raise_value_error(exported, tmp_path, field, value):
  root, params = exported
  d = tmp_path / "peft"
  shutil.rmtree(d, ignore_errors=True)
  shutil.copytree(root / "peft", d)
  _fuzzed_json_file(d / "adapter_config.json", field, value)
  try:
    peft.load_adapter(d, params)
  except ValueError:
    pass


@_FUZZ
@given(st.sampled_from(HF_FIELDS), _JSON)
def test_fuzzed_hf_config_fields_load_or_raise_value_error(exported, tmp_path, field, value):
  root, _ = exported
  d = tmp_path / "ck"
  shutil.rmtree(d, ignore_errors=True)
  shutil.copytree(root / "single", d)
  _fuzzed_json_file(d / "config.json", field, value)
  try:
    hf.load_checkpoint(d, tokenizer=False)
  except ValueError:
    pass
