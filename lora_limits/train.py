"""Training: a pure, jitted train step and a loop that resumes from checkpoints.

The step differentiates only what is trainable: all parameters for pretraining, only the
adapter factors for LoRA (the base params are a separate, frozen argument, and the adapter
runs unmerged, so no gradient is ever formed for a frozen kernel). Randomness is
`fold_in(key, step)`; batches are a pure function of the step (`lora_limits.data`), so a
resumed run is bitwise identical to an uninterrupted one. Data parallel over a `data` mesh
axis with `jax.jit` + `NamedSharding` (also over several processes: each feeds its own rows,
and the trained result comes back as each process's local copy); metrics are fetched one
step late, so the host never waits on the device inside the loop. The compiled step is
shared: every run with the same model config, optimizer settings and kind (every adapter of a
study, every seed's pretraining) reuses one program, the key being an argument, not a
constant baked into it.

A step whose loss or gradient norm is not finite leaves the state unchanged and is
reported; the loop then stops with `NonFiniteError` naming the step and the last good
checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_limits import checkpoint as ckpt_lib
from lora_limits import data as data_lib
from lora_limits import lora as lora_lib
from lora_limits import metrics as metrics_lib
from lora_limits import sharding as shard_lib
from lora_limits.models import transformer

_SCHEDULES = ("cosine", "constant")


class NonFiniteError(FloatingPointError):
  """The loss or the gradients became NaN/Inf."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup, then cosine decay to `end_lr_fraction` (or constant)."""

  learning_rate: float = 3e-3
  warmup_steps: int = 20
  schedule: str = "cosine"
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.98
  grad_clip: float = 1.0  # global-norm clip; 0 disables

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"OptimConfig.learning_rate must be > 0, got {self.learning_rate!r}")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"OptimConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
    if self.schedule not in _SCHEDULES:
      raise ValueError(f"OptimConfig.schedule={self.schedule!r} is not one of {list(_SCHEDULES)}")
    if not 0.0 <= self.end_lr_fraction <= 1.0:
      raise ValueError(f"OptimConfig.end_lr_fraction must be in [0, 1], got {self.end_lr_fraction!r}")
    if self.weight_decay < 0 or self.grad_clip < 0:
      raise ValueError("OptimConfig.weight_decay and grad_clip must be >= 0")
    if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
      raise ValueError(f"OptimConfig.b1, b2 must be in [0, 1), got {self.b1!r}, {self.b2!r}")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  if cfg.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warmup),
         optax.constant_schedule(cfg.learning_rate)], [warmup])
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.end_lr_fraction)


@functools.lru_cache(maxsize=32)
def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW per `cfg` (memoised: equal settings give the same object, so the train steps built
  on it share one compiled program)."""
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  trainable: Any
  opt_state: Any


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "trainable", "opt_state"],
                                 meta_fields=[])


def make_train_step(model_cfg: transformer.ModelConfig, optimizer: optax.GradientTransformation,
                    *, kind: str, key: jax.Array, lora_dropout: float = 0.0) -> "TrainStep":
  """step(state, frozen, batch) -> (state, metrics); `kind` is 'full' or 'lora'.

  full: trainable = params, frozen unused. lora: trainable = adapter, frozen = base params.
  """
  if kind not in ("full", "lora"):
    raise ValueError(f"kind={kind!r} is not one of ['full', 'lora']")
  return TrainStep(model_cfg, optimizer, kind, float(lora_dropout), key)


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A train step: the program (`model_cfg`, `optimizer`, `kind`, `lora_dropout`, compared
  and hashed) and its key (an argument of the program; neither compared nor hashed)."""

  model_cfg: transformer.ModelConfig
  optimizer: optax.GradientTransformation
  kind: str
  lora_dropout: float
  key: jax.Array = dataclasses.field(compare=False)

  def __call__(self, state: TrainState, frozen, batch):
    return _step_program(self.model_cfg, self.optimizer, self.kind, self.lora_dropout)(
        state, frozen, batch, self.key)


@functools.lru_cache(maxsize=32)
def _step_program(model_cfg: transformer.ModelConfig, optimizer: optax.GradientTransformation,
                  kind: str, lora_dropout: float):
  """step(state, frozen, batch, key) -> (state, metrics), one Python function per program."""

  def loss_fn(trainable, frozen, batch, step_key):
    packing = {"positions_BxT": batch.get("positions"),
               "segment_ids_BxT": batch.get("segment_ids")}
    if kind == "full":
      logits = transformer.apply(trainable, model_cfg, batch["inputs"], **packing)
    else:
      mix = lora_lib.LoraMix.single(trainable, dropout=lora_dropout)
      logits = transformer.apply(frozen, model_cfg, batch["inputs"], lora=mix,
                                 dropout_key=step_key if lora_dropout > 0 else None, **packing)
    metrics = metrics_lib.batch_metrics(logits, batch["targets"], batch["weights"])
    return metrics["loss"], metrics

  def step(state: TrainState, frozen, batch, key):
    step_key = jax.random.fold_in(key, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.trainable, frozen, batch, step_key)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = TrainState(state.step + 1, trainable, opt_state)
    # A non-finite step leaves the state untouched (the loop stops on the flag).
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    metrics = dict(metrics, grad_norm=grad_norm, finite=ok)
    return new, metrics

  return step


@functools.lru_cache(maxsize=32)
def _jitted_program(step: TrainStep, rep, bat):
  """The compiled form of `step`'s program, shared by every step equal to it."""
  program = _step_program(step.model_cfg, step.optimizer, step.kind, step.lora_dropout)
  return jax.jit(program, in_shardings=(rep, rep, bat, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int
  batch_size: int
  seed: int = 0
  loss_on: str = "answer"
  save_every: int = 0  # 0: only at the end (when a checkpoint dir is given)
  eval_every: int = 0  # how often `stop_fn` is consulted; 0: never

  def __post_init__(self):
    for name in ("steps", "batch_size"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"LoopConfig.{name} must be a positive int, got {v!r}")
    for name in ("seed", "save_every", "eval_every"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 0:
        raise ValueError(f"LoopConfig.{name} must be an int >= 0, got {v!r}")
    if self.loss_on not in ("all", "answer"):
      raise ValueError(f"LoopConfig.loss_on={self.loss_on!r} is not one of ['all', 'answer']")


MetricsCallback = Callable[[int, dict[str, float]], None]
StopFn = Callable[[int, Any], bool]


def fit(step_fn, trainable, frozen, data: data_lib.Encoded, loop: LoopConfig,
        optimizer: optax.GradientTransformation, *, mesh=None,
        checkpoint_dir: str | None = None, record: Mapping[str, Any] | None = None,
        on_metrics: MetricsCallback | None = None, stop_fn: StopFn | None = None):
  """Run `loop.steps` steps (resuming from `checkpoint_dir` if it holds a checkpoint).

  Returns (trainable, history, stopped_early_at | None). `record` (e.g. the resolved
  config) is stored with each checkpoint. `stop_fn(step, trainable) -> bool` is consulted
  every `loop.eval_every` steps (a host sync) and ends training when it returns True.
  """
  if data_lib.size(data) == 0:
    raise ValueError("fit got an empty dataset")
  mesh = mesh if mesh is not None else shard_lib.data_mesh(1)
  shard_lib.check_batch_divisible(loop.batch_size, mesh)
  rep, bat = shard_lib.replicated(mesh), shard_lib.batch_sharded(mesh)

  state = TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
  state = shard_lib.put_replicated(state, rep)
  frozen = shard_lib.put_replicated(frozen, rep) if frozen is not None else None
  history: list[dict[str, float]] = []
  stopped_at = None
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir) if checkpoint_dir else None
  if checkpointer is not None and checkpointer.latest_step() is not None:
    latest = checkpointer.latest_step()
    state, saved = checkpointer.restore(latest, state)
    state = jax.device_put(state, rep)
    history = list(saved.get("history", []))
    stopped_at = saved.get("stopped_early_at")
    if saved.get("data_position") != latest:
      raise ckpt_lib.CheckpointError(
          f"checkpoint step {latest} in {checkpoint_dir} records data position "
          f"{saved.get('data_position')!r}; expected {latest}")

  if isinstance(step_fn, TrainStep):  # one program for every equal step (see the docstring)
    program = _jitted_program(step_fn, rep, bat)
    key = shard_lib.put_replicated(step_fn.key, rep)
    jitted = lambda state, frozen, batch: program(state, frozen, batch, key)
  else:  # any other step function (a wrapped or instrumented one) is compiled for this run
    jitted = jax.jit(step_fn, in_shardings=(rep, rep, bat), out_shardings=(rep, rep),
                     donate_argnums=(0,))

  def save(step: int):
    if checkpointer is not None:
      checkpointer.save(step, state, {"data_position": step, "history": history,
                                      "stopped_early_at": stopped_at,
                                      "record": dict(record or {})})

  def finish(step: int, metrics) -> None:
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not host.pop("finite"):
      last = checkpointer.latest_step() if checkpointer is not None else None
      where = (f"last good checkpoint: step {last} in {checkpoint_dir}" if last is not None
               else "no checkpoint was saved")
      raise NonFiniteError(
          f"non-finite loss or gradient at step {step} (loss={host['loss']}, "
          f"grad_norm={host['grad_norm']}); the update was not applied; {where}")
    host["step"] = step
    history.append(host)
    if on_metrics is not None:
      on_metrics(step, host)

  start = int(state.step)
  pending = None
  try:
    for step in range(start, loop.steps):
      if stopped_at is not None:
        break
      batch = data_lib.batch_at(data, loop.batch_size, loop.seed, step, loop.loss_on)
      batch = shard_lib.put_batch(batch, bat)  # each process sends only its own rows
      state, metrics = jitted(state, frozen, batch)
      if pending is not None:
        finish(*pending)
      pending = (step + 1, metrics)
      done = step + 1
      at_eval = stop_fn is not None and loop.eval_every and done % loop.eval_every == 0
      at_save = loop.save_every and done % loop.save_every == 0
      if at_eval or at_save or done == loop.steps:
        finish(*pending)
        pending = None
      if at_eval and stop_fn(done, shard_lib.to_local(state.trainable)):
        stopped_at = done
      if at_save or stopped_at is not None or done == loop.steps:
        save(done)
    if pending is not None:
      finish(*pending)
  finally:
    if checkpointer is not None:
      checkpointer.close()
  return shard_lib.to_local(state.trainable), history, stopped_at


def pretrain(model_cfg: transformer.ModelConfig, data: data_lib.Encoded, *,
             optim: OptimConfig, loop: LoopConfig, init_params=None, mesh=None,
             checkpoint_dir: str | None = None, record=None, on_metrics=None):
  """Full training of all parameters (from `init_params` or a fresh init keyed by seed)."""
  key = jax.random.key(loop.seed)
  params = init_params if init_params is not None else transformer.init(
      jax.random.fold_in(key, 0), model_cfg)
  optimizer = make_optimizer(optim, loop.steps)
  step_fn = make_train_step(model_cfg, optimizer, kind="full", key=jax.random.fold_in(key, 1))
  params, history, _ = fit(step_fn, params, None, data, loop, optimizer, mesh=mesh,
                           checkpoint_dir=checkpoint_dir, record=record, on_metrics=on_metrics)
  return params, history


def train_lora(params, model_cfg: transformer.ModelConfig, spec: lora_lib.LoraConfig,
               data: data_lib.Encoded, *, optim: OptimConfig, loop: LoopConfig, mesh=None,
               checkpoint_dir: str | None = None, record=None, on_metrics=None,
               stop_fn: StopFn | None = None):
  """Train one adapter on frozen `params`. Returns (adapter, history, stopped_early_at)."""
  key = jax.random.key(loop.seed)
  adapter = lora_lib.init(jax.random.fold_in(key, 0), params, spec)
  optimizer = make_optimizer(optim, loop.steps)
  step_fn = make_train_step(model_cfg, optimizer, kind="lora", key=jax.random.fold_in(key, 1),
                            lora_dropout=spec.dropout)
  return fit(step_fn, adapter, params, data, loop, optimizer, mesh=mesh,
             checkpoint_dir=checkpoint_dir, record=record, on_metrics=on_metrics,
             stop_fn=stop_fn)
