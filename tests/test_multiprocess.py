"""Several processes: multi-controller JAX on localhost (CPU collectives), and study shards.

Each job is started as subprocesses of `tests/multiproc_worker.py` (or `experiments.run`),
each with its own fake CPU device, joined at a free loopback port. Compared with the same
work in one process (this one: 4 fake devices, but the studies train on one device when
there is one process): losses, parameters, checkpoints, and a sharded sweep's records.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, distributed
from experiments.studies.recycling import report
from lora_limits import checkpoint, sharding, train, tree

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import multiproc_worker  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multiproc_worker.py"
TIMEOUT_S = 1800  # a bound, not an expectation: 2 cores shared with other work (900 s was
# too short for the slow cases at a load average of 15-25)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def environment() -> dict[str, str]:
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID",
               "TPU_WORKER_HOSTNAMES", "XLA_FLAGS"):
    env.pop(name, None)
  return env


def start_job(workdir: pathlib.Path, *args: str, n: int = 2) -> list[subprocess.Popen]:
  workdir.mkdir(parents=True, exist_ok=True)
  port = free_port()
  procs = []
  for i in range(n):
    with open(workdir / f"log{i}", "ab") as log:
      procs.append(subprocess.Popen(
          [sys.executable, str(WORKER), str(workdir), f"--num_processes={n}",
           f"--process_id={i}", f"--port={port}", *args],
          cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT))
  return procs


def finish(procs: list[subprocess.Popen], workdir: pathlib.Path) -> None:
  deadline = time.time() + TIMEOUT_S
  try:
    for i, p in enumerate(procs):
      rc = p.wait(timeout=max(deadline - time.time(), 1))
      assert rc == 0, f"process {i} exited with {rc}:\n{(workdir / f'log{i}').read_text()[-3000:]}"
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def flat(tree_: dict) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in tree.flatten(tree_).items()}


def restore_like(ckpt_dir: pathlib.Path, params, optimizer):
  """The latest checkpoint in `ckpt_dir`, restored in this (one) process."""
  like = train.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  try:
    state, _ = ckpt.restore(ckpt.latest_step(), like)
  finally:
    ckpt.close()
  return state


# ------------------------------------------------------------------- fast: one micro model


def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
  """Data parallel over 2 processes (each feeding its own rows): the losses of one process
  on one device; the checkpoint both processes saved restores here with the values they
  ended with (the restore also checks the state digest and process 0's file list)."""
  finish(start_job(tmp_path / "two", "--tiny"), tmp_path / "two")
  params, history, optimizer = multiproc_worker.tiny(tmp_path / "one")
  two = json.loads((tmp_path / "two" / "history.json").read_text())
  assert len(two) == len(history) == multiproc_worker.TINY_STEPS
  np.testing.assert_allclose([h["loss"] for h in two], [h["loss"] for h in history],
                             rtol=1e-5)
  final = dict(np.load(tmp_path / "two" / "final.npz"))
  ours = flat(params)
  assert final.keys() == ours.keys()
  for k in ours:
    np.testing.assert_allclose(final[k], ours[k], rtol=1e-4, atol=1e-6, err_msg=k)
  ckpt_dir = tmp_path / "two" / "ckpt"
  assert (ckpt_dir / "file_sha256" / f"{multiproc_worker.TINY_STEPS}.json").is_file()
  state = restore_like(ckpt_dir, params, optimizer)
  assert int(state.step) == multiproc_worker.TINY_STEPS
  restored = flat(state.trainable)
  for k in final:
    np.testing.assert_array_equal(restored[k], final[k], err_msg=k)


# ----------------------------------------------------- slow: the smoke study's base and adapter


def _history(workdir: pathlib.Path, kind: str) -> list[dict]:
  (path,) = workdir.glob(f"cache/{kind}/*/metrics.jsonl")
  return common.read_jsonl(path)


@pytest.mark.slow
def test_smoke_pretraining_and_adapter_on_two_processes_match_one(tmp_path):
  finish(start_job(tmp_path / "two"), tmp_path / "two")
  params, adapter, _ = multiproc_worker.train(tmp_path / "one")
  for kind in ("base", "adapters"):
    ours, two = _history(tmp_path / "one", kind), _history(tmp_path / "two", kind)
    assert [h["step"] for h in two] == [h["step"] for h in ours]
    np.testing.assert_allclose([h["loss"] for h in two], [h["loss"] for h in ours],
                               rtol=1e-4, err_msg=kind)
  final = dict(np.load(tmp_path / "two" / "final.npz"))
  for k, v in flat(params).items():
    np.testing.assert_allclose(final[f"base/{k}"], v, rtol=1e-3, atol=1e-5, err_msg=k)
  for k, f in adapter.items():
    np.testing.assert_allclose(final[f"adapter/{k}/a"], f.a, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(final[f"adapter/{k}/b"], f.b, rtol=1e-3, atol=1e-5)
  # The two-process base checkpoint restores in one process, to the values it ended with.
  cfg = multiproc_worker.smoke_config()
  optimizer = train.make_optimizer(train.OptimConfig(
      learning_rate=cfg.pretrain.learning_rate, warmup_steps=cfg.pretrain.warmup_steps,
      weight_decay=cfg.pretrain.weight_decay), cfg.pretrain.steps)
  (ckpt_dir,) = (tmp_path / "two").glob("cache/base/*/ckpt")
  restored = flat(restore_like(ckpt_dir, params, optimizer).trainable)
  for k, v in restored.items():
    np.testing.assert_array_equal(v, final[f"base/{k}"], err_msg=k)


def _step_dirs(ckpt_dir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_killing_one_process_leaves_a_checkpoint_both_resume_from(tmp_path):
  steps = 200  # long enough to kill inside pretraining (checkpoints every 20 steps)
  workdir = tmp_path / "killed"
  procs = start_job(workdir, f"--steps={steps}")
  deadline = time.time() + TIMEOUT_S
  try:
    while not [d for d in workdir.glob("cache/base/*/ckpt") if 40 in _step_dirs(d)]:
      assert all(p.poll() is None for p in procs), "a process ended before the kill"
      assert time.time() < deadline, "no checkpoint at step 40"
      time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].wait()
    # Process 0 now fails in a collective or waits on its peer (until the coordination
    # service's heartbeat timeout); a cluster scheduler ends the whole step at once: so do we.
    time.sleep(1.0)
    if procs[0].poll() is None:
      os.kill(procs[0].pid, signal.SIGKILL)
    assert procs[0].wait() != 0, "process 0 finished although its peer was killed"
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  (ckpt_dir,) = workdir.glob("cache/base/*/ckpt")
  killed_at = _step_dirs(ckpt_dir)[-1]
  assert 40 <= killed_at < steps
  assert not (workdir / "final.npz").exists()
  finish(start_job(workdir, f"--steps={steps}"), workdir)
  started = json.loads((workdir / "started.json").read_text())
  assert list(started.values()) == [killed_at]  # the rerun resumed the base, not restarted
  params, _, _ = multiproc_worker.train(tmp_path / "one", steps)
  ours, two = _history(tmp_path / "one", "base"), _history(workdir, "base")
  assert [h["step"] for h in two] == list(range(1, steps + 1))
  np.testing.assert_allclose([h["loss"] for h in two], [h["loss"] for h in ours], rtol=1e-4)
  final = dict(np.load(workdir / "final.npz"))
  for k, v in flat(params).items():
    np.testing.assert_allclose(final[f"base/{k}"], v, rtol=1e-3, atol=1e-5, err_msg=k)


# ------------------------------------------------------------------------ shards of a sweep


def _sweep_config():
  from ml_collections import config_dict

  from configs import smoke
  base = smoke.get_config()
  base.recycle.methods = ("sum",)
  base.recycle.libraries = ("two",)
  c = config_dict.ConfigDict()
  c.study = "sweep"
  c.sweep = config_dict.ConfigDict(dict(field="adapters.rank", values=(1, 2)))
  c.base = base
  return c


@pytest.fixture
def whole_shard():
  yield
  distributed.set_shard(distributed.Shard())


@pytest.mark.slow
def test_a_sweep_in_two_shards_merges_to_the_records_of_one_run(tmp_path, whole_shard, capsys):
  from experiments.studies import sweep
  sweep.main(_sweep_config(), tmp_path / "one")
  sharded = tmp_path / "sharded"
  distributed.set_shard(distributed.Shard(0, 2))
  sweep.main(_sweep_config(), sharded)
  assert not (sharded / "sweep_results.jsonl").exists()  # shard 1's point is missing
  assert report.main(["report", str(sharded)]) == 1
  assert "seeds [0] of [0] have no finished unit" in capsys.readouterr().err
  distributed.set_shard(distributed.Shard(1, 2))
  sweep.main(_sweep_config(), sharded)  # the last shard to finish merges
  one = (tmp_path / "one" / "sweep_results.jsonl").read_bytes()
  assert (sharded / "sweep_results.jsonl").read_bytes() == one
  (sharded / "sweep_results.jsonl").unlink()
  assert report.main(["report", str(sharded)]) == 0  # ... and so does the report
  assert (sharded / "sweep_results.jsonl").read_bytes() == one
  for run in ("adapters.rank=1", "adapters.rank=2"):
    assert ((sharded / "runs" / run / "results.jsonl").read_bytes()
            == (tmp_path / "one" / "runs" / run / "results.jsonl").read_bytes())


# --------------------------------------------------------------------- the pure parts, fast


def test_shards_partition_the_units():
  units = [(v, s) for v in range(3) for s in range(5)]
  for count in (1, 2, 4, 15, 20):
    parts = [distributed.shard_units(units, distributed.Shard(i, count)) for i in range(count)]
    assert sorted(u for p in parts for u in p) == sorted(units)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("index,count,env,expected", [
    (0, 0, {}, (0, 1)),
    (1, 3, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "5"}, (1, 3)),  # flags win
    (0, 0, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4",
            "SLURM_ARRAY_TASK_MIN": "0"}, (2, 4)),
    (0, 0, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3",
            "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}, (2, 3)),
])
def test_shard_from_flags_or_the_slurm_array(index, count, env, expected):
  shard = distributed.resolve_shard(index, count, env)
  assert (shard.index, shard.count) == expected


@pytest.mark.parametrize("index,count,match", [
    (2, 2, r"--shard_index=2 must be in \[0, --num_shards=2\)"),
    (0, -1, r"--num_shards must be >= 1"),
    (1, 0, r"--shard_index=1 needs --num_shards"),
])
def test_bad_shards_are_refused(index, count, match):
  with pytest.raises(ValueError, match=match):
    distributed.resolve_shard(index, count, {})


@pytest.mark.parametrize("settings,env,expected", [
    (distributed.ProcessConfig(), {}, False),
    (distributed.ProcessConfig(num_processes=2, process_id=1), {}, True),
    (distributed.ProcessConfig(mode="on"), {}, True),
    (distributed.ProcessConfig(), {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    (distributed.ProcessConfig(), {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                                   "SLURM_NTASKS": "4"}, True),
    # An array task (or a batch script) of one task is one process: no job to join.
    (distributed.ProcessConfig(), {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                                   "SLURM_NTASKS": "1", "SLURM_ARRAY_TASK_ID": "3"}, False),
    # The batch script of an --ntasks=4 job, outside srun: one process.
    (distributed.ProcessConfig(), {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                                   "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, False),
    (distributed.ProcessConfig(), {"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, True),
    (distributed.ProcessConfig(), {"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    (distributed.ProcessConfig(mode="off"), {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                                             "SLURM_NTASKS": "4"}, False),
])
def test_when_to_join_a_multi_process_job(settings, env, expected):
  assert distributed.wants_initialize(settings, env) is expected


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="sometimes"), r"--distributed='sometimes' is not one of"),
    (dict(num_processes=2, process_id=2), r"--process_id=2 must be in \[0, --num_processes=2\)"),
    (dict(mode="off", coordinator_address="127.0.0.1:1"), r"--distributed=off contradicts"),
])
def test_bad_process_settings_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.ProcessConfig(**kwargs)


def test_one_process_puts_the_whole_batch_and_keeps_its_arrays():
  mesh = sharding.data_mesh(4)
  bat = sharding.batch_sharded(mesh)
  batch = {"inputs": np.arange(16).reshape(8, 2), "weights": np.ones((8, 2), np.float32)}
  assert sharding.process_rows(bat, 8) == slice(0, 8)
  put = sharding.put_batch(batch, bat)
  assert put["inputs"].sharding == bat
  np.testing.assert_array_equal(put["inputs"], batch["inputs"])
  with pytest.raises(ValueError, match="differ in their leading"):
    sharding.put_batch({"a": np.zeros(8), "b": np.zeros(4)}, bat)
  x = jax.device_put(jnp.ones(3), sharding.replicated(mesh))
  assert sharding.to_local({"x": x})["x"] is x  # one process: already local


def test_report_refuses_a_study_with_unfinished_shards(tmp_path, capsys):
  common.write_json(tmp_path / "config.json", {"task": "two_hop", "seeds": [0, 1]})
  from experiments.studies.recycling import units
  units.write_unit(units.unit_path(tmp_path, "two_hop", 1), [{"seed": 1}])
  assert report.main(["report", str(tmp_path)]) == 1
  assert "seeds [0] of [0, 1] have no finished unit" in capsys.readouterr().err
  assert not (tmp_path / "results.jsonl").exists()


# ---------------------------------------------------------------------- the launch scripts


def _fake(tmp_path: pathlib.Path, name: str) -> dict[str, str]:
  """PATH with a fake `name` that prints its arguments one per line."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  fake = bin_dir / name
  fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
  fake.chmod(0o755)
  return dict(environment(), PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_slurm_script_runs_the_study_with_its_arguments(tmp_path):
  env = dict(_fake(tmp_path, "srun"), SLURM_SUBMIT_DIR=str(REPO), PYTHON="python3")
  out = subprocess.run(["bash", "scripts/slurm.sbatch", "configs/sweep_rank.py", "runs/x",
                        "--config.base.seeds=(0, 1)"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == ["python3", "-m", "experiments.run",
                                     "--config=configs/sweep_rank.py", "--workdir=runs/x",
                                     "--config.base.seeds=(0, 1)"]
  usage = subprocess.run(["bash", "scripts/slurm.sbatch"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
  assert usage.returncode == 2 and "usage:" in usage.stderr


@pytest.mark.parametrize("extra", [(), ("--config.seeds=(0, 1)",)])
def test_tpu_pod_script_runs_one_process_per_host(tmp_path, extra):
  out = subprocess.run(["bash", "scripts/tpu_pod.sh", "pod", "zone-a", "configs/two_hop.py",
                        "/mnt/shared/w", *extra], cwd=REPO, env=_fake(tmp_path, "gcloud"),
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=zone-a"]
  assert lines[6] == "--worker=all"
  command = lines[7].removeprefix("--command=")
  # The remote shell's view of the command: the study, --distributed=on, the extra flags.
  words = subprocess.run(["bash", "-c", f'set -- {command.split("python -m ")[1]}; '
                          'printf "%s\\n" "$@"'], capture_output=True, text=True,
                         timeout=60).stdout.splitlines()
  assert words == ["experiments.run", "--config=configs/two_hop.py", "--workdir=/mnt/shared/w",
                   "--distributed=on", *extra]


def test_loading_any_config_leaves_the_jax_backend_unstarted():
  """`experiments.run` configures JAX (device count, jax.distributed.initialize) after the
  flags, i.e. after the config file is loaded: no config may start the backend."""
  code = """if True:
    import importlib, pkgutil
    from jax._src import xla_bridge
    import configs, experiments.run
    for m in pkgutil.iter_modules(configs.__path__):
      if not m.name.startswith("_"):
        importlib.import_module(f"configs.{m.name}").get_config()
    print("started" if xla_bridge.backends_are_initialized() else "unstarted")
  """
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "unstarted"
