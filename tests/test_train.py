"""Training: loss goes down, only adapters train, 1 vs 4 devices, resume is bitwise, NaN stops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_limits import checkpoint as ckpt_lib
from lora_limits import data as data_lib
from lora_limits import lora as lora_lib
from lora_limits import sharding as shard_lib
from lora_limits import train
from lora_limits.models import transformer

CFG = transformer.ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=48)


def _data(n=32, seed=0):
  rng = np.random.default_rng(seed)
  pairs = [(list(rng.integers(3, 40, 4)), list(rng.integers(3, 40, 2))) for _ in range(n)]
  return data_lib.encode(pairs, eos_id=1, pad_id=0)


@pytest.fixture(scope="module")
def base():
  params, _ = train.pretrain(CFG, _data(), optim=train.OptimConfig(learning_rate=1e-2),
                             loop=train.LoopConfig(steps=10, batch_size=8, loss_on="all"))
  return params


def _lora(base, steps=12, **kw):
  kw.setdefault("optim", train.OptimConfig(learning_rate=2e-2, warmup_steps=2))
  return train.train_lora(base, CFG, lora_lib.LoraConfig(rank=4), _data(seed=1),
                          loop=train.LoopConfig(steps=steps, batch_size=8, **kw.pop("loop", {})),
                          **kw)


def test_pretraining_lowers_the_loss():
  _, hist = train.pretrain(CFG, _data(), optim=train.OptimConfig(learning_rate=1e-2),
                           loop=train.LoopConfig(steps=30, batch_size=16, loss_on="all"))
  assert [h["step"] for h in hist] == list(range(1, 31))
  assert hist[-1]["loss"] < hist[0]["loss"] - 0.3


def test_lora_trains_only_the_adapter(base):
  adapter, hist, stopped = _lora(base, steps=40)
  assert stopped is None
  assert hist[-1]["loss"] < hist[0]["loss"]
  assert set(adapter) == set(lora_lib.target_paths(base, lora_lib.DEFAULT_TARGETS))
  assert all(float(jnp.abs(f.b).max()) > 0 for f in adapter.values())


def test_step_traces_once_per_shape(base):
  optim = train.OptimConfig()
  optimizer = train.make_optimizer(optim, 6)
  step = train.make_train_step(CFG, optimizer, kind="lora", key=jax.random.key(0))
  counted = chex.assert_max_traces(lambda state, frozen, batch: step(state, frozen, batch), n=1)
  adapter = lora_lib.init(jax.random.key(0), base, lora_lib.LoraConfig(rank=2))
  _, hist, _ = train.fit(counted, adapter, base, _data(), train.LoopConfig(steps=6, batch_size=8),
                         optimizer)
  assert len(hist) == 6


def test_equal_steps_share_one_compiled_program_and_keep_their_own_key(base):
  """Adapters of one study share the compiled step; the key is an argument, so dropout still
  follows each run's own key, exactly as a step compiled for that run alone."""
  optimizer = train.make_optimizer(train.OptimConfig(learning_rate=2e-2, warmup_steps=2), 5)
  assert optimizer is train.make_optimizer(train.OptimConfig(learning_rate=2e-2, warmup_steps=2), 5)
  loop = train.LoopConfig(steps=5, batch_size=8)
  mesh = shard_lib.data_mesh(1)
  adapter = lora_lib.init(jax.random.key(3), base, lora_lib.LoraConfig(rank=4))

  def run(key, wrap=False):
    step = train.make_train_step(CFG, optimizer, kind="lora", key=key, lora_dropout=0.5)
    fn = (lambda s, f, b: step(s, f, b)) if wrap else step  # a plain function: its own jit
    trained, _, _ = train.fit(fn, jax.tree.map(jnp.array, adapter), base, _data(seed=1), loop,
                              optimizer, mesh=mesh)
    return trained

  a, b = run(jax.random.key(0)), run(jax.random.key(1))
  program = train._jitted_program(
      train.make_train_step(CFG, optimizer, kind="lora", key=jax.random.key(9), lora_dropout=0.5),
      shard_lib.replicated(mesh), shard_lib.batch_sharded(mesh))
  assert program._cache_size() == 1  # two runs, two keys, one compilation
  alone = run(jax.random.key(1), wrap=True)
  chex.assert_trees_all_equal(b, alone)  # the shared program used run b's key
  assert not np.allclose(np.asarray(a["layers/0/attn/q_proj/kernel"].b),
                         np.asarray(b["layers/0/attn/q_proj/kernel"].b))


def test_one_device_and_four_devices_agree(base):
  assert len(jax.devices()) >= 4, "conftest sets 4 fake CPU devices"
  runs = []
  for n in (1, 4):
    _, hist, _ = _lora(base, steps=8, mesh=shard_lib.data_mesh(n))
    runs.append([h["loss"] for h in hist])
  np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)


def test_batch_must_divide_devices(base):
  with pytest.raises(ValueError, match="batch_size=6 must be divisible by the 4 devices"):
    train.train_lora(base, CFG, lora_lib.LoraConfig(rank=2), _data(), optim=train.OptimConfig(),
                     loop=train.LoopConfig(steps=2, batch_size=6), mesh=shard_lib.data_mesh(4))


class _Interrupt(Exception):
  pass


def test_interrupt_and_resume_is_bitwise_identical(base, tmp_path):
  full, full_hist, _ = _lora(base, steps=12)

  def crash_at_9(step, metrics):
    if step == 9:
      raise _Interrupt()

  with pytest.raises(_Interrupt):
    _lora(base, steps=12, loop={"save_every": 4}, checkpoint_dir=str(tmp_path),
          on_metrics=crash_at_9)
  assert ckpt_lib.Checkpointer(tmp_path).latest_step() == 8
  resumed, resumed_hist, _ = _lora(base, steps=12, loop={"save_every": 4},
                                   checkpoint_dir=str(tmp_path))
  assert resumed_hist == full_hist
  for p in full:
    np.testing.assert_array_equal(np.asarray(full[p].a), np.asarray(resumed[p].a))
    np.testing.assert_array_equal(np.asarray(full[p].b), np.asarray(resumed[p].b))


def test_early_stop_criterion_is_recorded_and_respected(base, tmp_path):
  calls = []

  def stop_after_6(step, adapter):
    calls.append(step)
    return step >= 6

  _, hist, stopped = _lora(base, steps=20, loop={"eval_every": 3}, stop_fn=stop_after_6,
                           checkpoint_dir=str(tmp_path))
  assert stopped == 6 and calls == [3, 6] and len(hist) == 6
  # Resuming a finished, early-stopped run does no more steps.
  _, hist2, stopped2 = _lora(base, steps=20, loop={"eval_every": 3}, stop_fn=stop_after_6,
                             checkpoint_dir=str(tmp_path))
  assert stopped2 == 6 and hist2 == hist


def test_nonfinite_loss_stops_with_step_and_keeps_last_checkpoint(base, tmp_path):
  poisoned = _data(seed=1)
  optim = train.OptimConfig(learning_rate=1e-2)
  optimizer = train.make_optimizer(optim, 10)
  good = train.make_train_step(CFG, optimizer, kind="lora", key=jax.random.key(0))

  def step_with_nan_after_5(state, frozen, batch):
    new, metrics = good(state, frozen, batch)
    bad = state.step >= 5
    loss = jnp.where(bad, jnp.nan, metrics["loss"])
    ok = metrics["finite"] & ~bad
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    return new, dict(metrics, loss=loss, finite=ok)

  adapter = lora_lib.init(jax.random.key(0), base, lora_lib.LoraConfig(rank=2))
  with pytest.raises(train.NonFiniteError, match=r"at step 6 .*last good checkpoint: step 4"):
    train.fit(step_with_nan_after_5, adapter, base, poisoned,
              train.LoopConfig(steps=10, batch_size=8, save_every=2), optimizer,
              checkpoint_dir=str(tmp_path))
  ck = ckpt_lib.Checkpointer(tmp_path)
  assert ck.latest_step() == 4
  like = train.TrainState(jnp.zeros((), jnp.int32), adapter, optimizer.init(adapter))
  state, record = ck.restore(4, like)
  assert int(state.step) == 4 and record["data_position"] == 4
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def test_corrupt_checkpoint_is_refused_with_its_name(base, tmp_path):
  _lora(base, steps=4, loop={"save_every": 4}, checkpoint_dir=str(tmp_path))
  victims = [p for p in (tmp_path / "4").rglob("*") if p.is_file() and p.stat().st_size > 0
             and "state" in str(p)]
  assert victims
  for p in victims:
    p.write_bytes(b"\x00garbage")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoint step 4 in .* cannot be restored"):
    _lora(base, steps=8, loop={"save_every": 4}, checkpoint_dir=str(tmp_path))


@pytest.mark.parametrize("kwargs,match", [
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(schedule="step"), r"schedule='step' is not one of"),
    (dict(warmup_steps=-1), "warmup_steps must be an int >= 0"),
])
def test_bad_optim_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    train.OptimConfig(**kwargs)


def test_batches_are_a_pure_function_of_seed_and_step():
  a = data_lib.batch_indices(10, 4, seed=3, step=7)
  b = data_lib.batch_indices(10, 4, seed=3, step=7)
  np.testing.assert_array_equal(a, b)
  epoch = np.concatenate([data_lib.batch_indices(10, 5, 3, s) for s in range(2)])
  assert sorted(epoch) == list(range(10))
  assert not np.array_equal(data_lib.batch_indices(10, 4, seed=4, step=7), a)


def test_lm_batch_weights_answer_span_only():
  ds = data_lib.encode([([5, 6, 7], [8, 9])], eos_id=1, pad_id=0, max_len=8)
  b = data_lib.lm_batch(ds, "answer")
  # tokens: 5 6 7 8 9 1 0 0 ; targets are tokens[1:]; answer targets 8 9 1 at target idx 2,3,4
  np.testing.assert_array_equal(b["weights"][0], [0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(data_lib.lm_batch(ds, "all")["weights"][0], [1, 1, 1, 1, 1, 0, 0])
