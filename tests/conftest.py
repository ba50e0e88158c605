"""Test-session set-up: 4 fake CPU devices, offline Hugging Face, no network, and one JAX
compilation cache for the session."""

import atexit
import os
import shutil
import socket
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A persistent compilation cache shared by this process and every subprocess it starts (the
# smoke studies run as `python -m experiments.run` several times: kill and resume, damaged
# files, sweeps): the same programs compile once per session instead of once per process.
# A cached executable is the compiled program itself, so results are unchanged. Set
# JAX_COMPILATION_CACHE_DIR to keep a cache between sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="lora-limits-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

# Before the first JAX operation: 4 fake CPU devices so sharding code is tested.
jax.config.update("jax_num_cpu_devices", 4)

import pytest  # noqa: E402

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
  host = address[0] if isinstance(address, tuple) else address
  if isinstance(host, str) and not (
      host.startswith("127.") or host in ("localhost", "::1") or self.family == socket.AF_UNIX):
    raise RuntimeError(f"test tried to open a network connection to {address!r}")
  return _real_connect(self, address)


def pytest_collection_modifyitems(config, items):
  """For pytest-xdist's `--dist loadgroup` (as `make test` runs): each test file goes whole to
  one worker, so its module-scoped fixtures (smoke studies, tiny models) are made once, and
  files marked with one `xdist_group` share a worker (and its session-cached runs)."""
  del config
  for item in items:
    if item.get_closest_marker("xdist_group") is None:
      item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
  monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
  yield


@pytest.fixture(autouse=True, scope="session")
def _drop_orbax_abandoned_reads():
  """Orbax reads arrays concurrently; when a deliberately damaged checkpoint fails to
  restore, its other pending reads die with 'Event loop is closed' whenever they are
  garbage-collected — sometimes tests later, where pytest would blame an innocent test.
  The restore itself has already failed loudly (CheckpointError); drop only these."""
  inner = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
      return
    inner(unraisable)

  sys.unraisablehook = hook
  yield
  sys.unraisablehook = inner
