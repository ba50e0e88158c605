"""Test-session set-up: 4 fake CPU devices, offline Hugging Face, no network."""

import os
import socket
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
