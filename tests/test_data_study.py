"""The 'data' study: deterministic files, an auditable manifest, a loadable tokenizer, the CLI."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import data as data_config
from experiments.studies import data as data_study
from lora_limits import tasks
from lora_limits import tokenizer as tk

ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_config():
  config = data_config.get_config()
  config.seeds = (0,)
  config.two_hop.update(dict(test_chains=4, target_chains=3, filler_chains=24, pool_size=3))
  config.math.update(dict(max_factor=4, test_triples=6, scene_sentences=150,
                          domain_problems=20))
  return config


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_config_same_files_and_manifest(tmp_path, capsys):
  data_study.main(small_config(), tmp_path / "a")
  printed = json.loads(capsys.readouterr().out)
  data_study.main(small_config(), tmp_path / "b")
  files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
  assert files_a == files_b
  manifest = json.loads(files_a["manifest.json"])
  assert manifest == printed
  th = manifest["worlds"]["two_hop"]["seed0"]
  assert th["splits"]["F"]["test_two_hop_cot"] == 4 and th["splits"]["R"]["target"] == 6
  assert th["exposure"]["F"]["mentions/head"] == [0, 0]
  assert th["exposure"]["F"]["fact_free/head"] == [8, 8]
  assert th["exposure"]["R"]["facts/hop2"] == [8, 8]
  assert th["exposure"]["R"]["facts/composed"] == [0, 0]
  assert th["max_row_tokens"] <= 32
  settings = tasks.TwoHopConfig(test_chains=4, target_chains=3, filler_chains=24,
                                pool_size=3)
  assert th["content_hash"] == tasks.content_hash(tasks.build(settings))
  assert "two_hop/seed0/R/test_two_hop_direct.jsonl" in files_a
  assert "math/seed0/math/target_cot.jsonl" in files_a


def test_written_splits_and_tokenizer_load_back(tmp_path, capsys):
  data_study.main(small_config(), tmp_path)
  capsys.readouterr()
  tok = tk.load(tmp_path / "tokenizer")
  examples = data_study.load_split(tmp_path / "two_hop/seed0/H/test_two_hop_cot.jsonl")
  assert len(examples) == 4 and examples[0].meta["bridge"]
  tk.check_round_trip(tok, [e.text for e in examples])
  rows = tk.encode_examples(tok, examples)
  assert rows["tokens"].shape[0] == 4
  # The same tokenizer serves another seed of the same settings.
  other = tasks.build(tasks.MathConfig(seed=5, max_factor=4, test_triples=6,
                                       scene_sentences=150, domain_problems=20))
  tk.check_round_trip(tok, other.texts())


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.update(colour="red"), "colour"),
    (lambda c: c["two_hop"].update(seed=3), "seed"),
    (lambda c: c["two_hop"].update(tiers=("F", "Z")), "tiers"),
    (lambda c: c.update(worlds=("chess",)), "worlds"),
    (lambda c: c["math"].update(max_factor="7"), "max_factor"),
])
def test_bad_config_names_the_field(tmp_path, mutate, match):
  config = small_config().to_dict()
  mutate(config)
  with pytest.raises(ValueError, match=match):
    data_study.main(config, tmp_path)


def test_command_line_writes_and_prints_the_manifest(tmp_path):
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "experiments.run", "--config=configs/data.py",
         f"--workdir={tmp_path}", "--config.seeds=(1,)", "--config.worlds=('math',)",
         "--config.math.max_factor=4", "--config.math.test_triples=6"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  manifest = json.loads(out.stdout)
  assert list(manifest["worlds"]) == ["math"]
  assert manifest["worlds"]["math"]["seed1"]["splits"]["math"]["test_two_hop_direct"] > 0
  assert (tmp_path / "manifest.json").exists() and (tmp_path / "tokenizer").is_dir()
