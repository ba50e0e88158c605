"""Same seed and config → identical files across two separate runs; another seed differs.

Each run is its own process (`python -m experiments.run --config=configs/smoke.py`) with its
own string-hash seed, so results that depended on set iteration order or on anything left
over in a process would differ. Every file of the workdir is compared by SHA-256 (see
`reliability_smoke` for the two exceptions: wall-clock seconds, and orbax's container files,
whose records carry the SHA-256 of the saved train state instead).
"""

from __future__ import annotations

import json
import os
import socket

import pytest

import reliability_smoke as smoke

# The smoke reference run (`reliability_smoke.reference_run`) is made once per worker.
pytestmark = pytest.mark.xdist_group("smoke_reference")


@pytest.mark.slow  # the default suite's kill test already compares two processes' outputs
def test_same_seed_gives_identical_files(tmp_path_factory):
  reference = smoke.reference_run(tmp_path_factory.getbasetemp())
  again = tmp_path_factory.mktemp("again")
  smoke.run(again, again.parent / f"{again.name}.log")
  ref_files, got_files = smoke.file_digests(reference), smoke.file_digests(again)
  expected = {"results.jsonl", "report.md", "config.json", "units/two_hop-seed0.jsonl",
              "figures/two_hop_a_tier.png", "tokenizer/tokenizer.json"}
  assert expected <= set(ref_files)
  assert sum(k.endswith("metrics.jsonl") for k in ref_files) >= 5  # base + 4 adapters
  assert smoke.differences(ref_files, got_files) == []
  ref_ckpt = smoke.checkpoint_records(reference)
  assert ref_ckpt and all(r.get("_state_sha256") for r in ref_ckpt.values())
  assert smoke.differences(ref_ckpt, smoke.checkpoint_records(again)) == []


@pytest.mark.slow
def test_another_seed_gives_other_results(tmp_path_factory):
  reference = smoke.reference_run(tmp_path_factory.getbasetemp())
  other = tmp_path_factory.mktemp("seed1")
  smoke.run(other, other.parent / f"{other.name}.log", "--config.seeds=(1,)")
  ref_records = [json.loads(x) for x in (reference / "results.jsonl").read_text().splitlines()]
  got_records = [json.loads(x) for x in (other / "results.jsonl").read_text().splitlines()]
  assert {r["seed"] for r in got_records} == {1}
  # Same record layout, but the worlds, base models and adapters differ.
  assert len(got_records) == len(ref_records)
  ref_bases = sorted(p.name for p in (reference / "cache" / "base").iterdir())
  got_bases = sorted(p.name for p in (other / "cache" / "base").iterdir())
  assert ref_bases != got_bases
  ref_digests = {r["_state_sha256"] for r in smoke.checkpoint_records(reference).values()}
  got_digests = {r["_state_sha256"] for r in smoke.checkpoint_records(other).values()}
  assert ref_digests.isdisjoint(got_digests)
  ref_base_metrics = next((reference / "cache" / "base").glob("*/metrics.jsonl")).read_text()
  got_base_metrics = next((other / "cache" / "base").glob("*/metrics.jsonl")).read_text()
  assert ref_base_metrics != got_base_metrics
  # The tokenizer is built from the seed-independent vocabulary: identical across seeds.
  assert (reference / "tokenizer" / "tokenizer.json").read_bytes() == (
      other / "tokenizer" / "tokenizer.json").read_bytes()


def test_tests_run_offline_and_refuse_non_loopback_sockets():
  """Isolation (tests/conftest.py): HF offline, and any socket to a non-loopback address
  fails the test; loopback still works."""
  assert os.environ.get("HF_HUB_OFFLINE") == "1"
  assert smoke.environment()["HF_HUB_OFFLINE"] == "1"  # the subprocess runs, too
  with socket.socket() as s, pytest.raises(RuntimeError, match="network connection"):
    s.connect(("192.0.2.1", 9))  # TEST-NET-1: the guard raises before any packet
  with socket.socket() as server, socket.socket() as client:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client.connect(server.getsockname())
