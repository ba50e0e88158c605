"""The paper's one-layer key–value transformer, in float64, with LoRA on the MLP read-out W.

Model (Chen et al. 2025, arXiv 2506.13479, §"theory"; the MLP as a key–value memory):
  * entities e_X (unit norm, [N, D]) and relations e_REL (norm `relation_scale`, [R, D]);
  * attention: at the last position of "X REL" the head attends to the entity token with
    weight 1, its value projection V (orthogonal, [D, D]) writes V e_X into the residual
    stream, which already holds e_REL: x = V e_X + e_REL;
  * MLP: h = ReLU(U x) with U [F, D] Gaussian/√D — the *key* of the fact (X, REL);
  * read-out: logits = W h over the N entities (one-hot read-out), W [N, F] — the *value*
    memory, and the only matrix LoRA edits: W + ΔW with ΔW = b aᵀ, b [N, r], a [F, r].

Two-hop prompt "A REL1 REL2" (the attention pattern we assume): the last position (REL2)
attends to the one entity token A with weight 1, exactly as in a one-hop prompt; the residual
holds e_REL2 plus `two_hop_carry` · e_REL1 (the earlier relation token's embedding carried
forward, e.g. by a previous-token head): x = V e_A + ρ e_REL1 + e_REL2. The bridge entity B
appears nowhere in this computation. The chain-of-thought prompt "A REL1 B REL2" attends to
the *latest* entity token, B, so its key is the one-hop key h(B, REL2).

Convention: the paper's column vectors. Keys are stored as rows `h_MxF` (one per prompt);
logits are `h_MxF @ w_NxF.T`; an update ΔW is `[N, F]`. (The core model's kernels are
`[d_in, d_out]`, the transpose.) Everything is NumPy float64; gradient descent runs in JAX
under a local `jax.enable_x64(True)` context, never the global flag.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_limits import validate

_READOUTS = ("lstsq", "train")


@dataclasses.dataclass(frozen=True)
class KVConfig:
  """Sizes of the toy. d_ff ≥ n_entities · n_relations lets least squares store every fact."""

  n_entities: int = 64
  n_relations: int = 2
  d_model: int = 64
  d_ff: int = 256
  relation_scale: float = 0.5  # ‖e_REL‖ (entities have norm 1)
  two_hop_carry: float = 1.0  # ρ: weight of e_REL1 in the two-hop residual

  def __post_init__(self):
    validate.integer("KVConfig.n_entities", self.n_entities, 2)
    validate.integer("KVConfig.n_relations", self.n_relations, 1)
    validate.integer("KVConfig.d_model", self.d_model, 1)
    validate.integer("KVConfig.d_ff", self.d_ff, 1)
    validate.number("KVConfig.relation_scale", self.relation_scale, 0)
    validate.number("KVConfig.two_hop_carry", self.two_hop_carry, 0)

  @property
  def n_facts(self) -> int:
    return self.n_entities * self.n_relations


@dataclasses.dataclass(frozen=True, eq=False)
class KVModel:
  """The frozen part of the toy (everything but the read-out W), float64 NumPy arrays."""

  cfg: KVConfig
  entity_NxD: np.ndarray
  relation_RxD: np.ndarray
  value_DxD: np.ndarray
  up_FxD: np.ndarray


def _np(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def init(key: jax.Array, cfg: KVConfig) -> KVModel:
  """Random unit entity embeddings, relation embeddings of norm `relation_scale`, an
  orthogonal value projection V and a Gaussian U (entries N(0, 1/D))."""
  k_e, k_r, k_v, k_u = jax.random.split(key, 4)
  with jax.enable_x64(True):
    e = jax.random.normal(k_e, (cfg.n_entities, cfg.d_model), jnp.float64)
    r = jax.random.normal(k_r, (cfg.n_relations, cfg.d_model), jnp.float64)
    v = jax.random.normal(k_v, (cfg.d_model, cfg.d_model), jnp.float64)
    u = jax.random.normal(k_u, (cfg.d_ff, cfg.d_model), jnp.float64)
    e, r, v, u = (np.array(x, dtype=np.float64) for x in (e, r, v, u))
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  r *= cfg.relation_scale / np.linalg.norm(r, axis=1, keepdims=True)
  q, rr = np.linalg.qr(v)
  q *= np.sign(np.diag(rr))  # a Haar-random orthogonal matrix
  return KVModel(cfg, e, r, q, u / math.sqrt(cfg.d_model))


def _check_index(name: str, idx, bound: int) -> np.ndarray:
  idx = np.asarray(idx)
  if idx.dtype.kind not in "iu":
    raise ValueError(f"{name} must be integer indices, got dtype {idx.dtype}")
  if idx.size and (idx.min() < 0 or idx.max() >= bound):
    raise ValueError(f"{name} has values in [{idx.min()}, {idx.max()}]; allowed [0, {bound - 1}]")
  return idx


def hidden(model: KVModel, entity_M, relation_M) -> np.ndarray:
  """One-hop keys h = ReLU(U (V e_X + e_REL)), one row per prompt "X REL": [M, F]."""
  x = _check_index("entity", entity_M, model.cfg.n_entities)
  r = _check_index("relation", relation_M, model.cfg.n_relations)
  resid = model.entity_NxD[x] @ model.value_DxD.T + model.relation_RxD[r]
  return np.maximum(resid @ model.up_FxD.T, 0.0)


def two_hop_hidden(model: KVModel, entity_M, rel1: int, rel2: int) -> np.ndarray:
  """Keys of "A REL1 REL2": h = ReLU(U (V e_A + ρ e_REL1 + e_REL2)) (see module doc)."""
  x = _check_index("entity", entity_M, model.cfg.n_entities)
  _check_index("rel1", np.array([rel1]), model.cfg.n_relations)
  _check_index("rel2", np.array([rel2]), model.cfg.n_relations)
  resid = (model.entity_NxD[x] @ model.value_DxD.T + model.cfg.two_hop_carry
           * model.relation_RxD[rel1] + model.relation_RxD[rel2])
  return np.maximum(resid @ model.up_FxD.T, 0.0)


def random_facts(key: jax.Array, cfg: KVConfig) -> np.ndarray:
  """The base knowledge: table[r, x] = r(x), uniform over entities, [R, N] int."""
  return np.asarray(jax.random.randint(key, (cfg.n_relations, cfg.n_entities), 0,
                                       cfg.n_entities), dtype=np.int64)


def all_facts(table_RxN: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(entity_M, relation_M, target_M) for every fact of the table, relation-major."""
  r, n = table_RxN.shape
  entity = np.tile(np.arange(n), r)
  relation = np.repeat(np.arange(r), n)
  return entity, relation, table_RxN[relation, entity]


def logits(w_NxF: np.ndarray, h_MxF: np.ndarray) -> np.ndarray:
  return h_MxF @ w_NxF.T


def predict(w_NxF: np.ndarray, h_MxF: np.ndarray) -> np.ndarray:
  return np.argmax(logits(w_NxF, h_MxF), axis=1)


def accuracy(w_NxF: np.ndarray, h_MxF: np.ndarray, target_M) -> float:
  return float(np.mean(predict(w_NxF, h_MxF) == np.asarray(target_M)))


def one_hot(target_M, n: int) -> np.ndarray:
  return np.eye(n)[np.asarray(target_M)]


def fit_readout(model: KVModel, table_RxN: np.ndarray, *, method: str = "lstsq",
                key: jax.Array | None = None, steps: int = 400,
                learning_rate: float = 0.05) -> np.ndarray:
  """Store the base facts in W ([N, F]).

  'lstsq': W = T Kᵀ⁺, the minimum-norm W with W h = i_{r(x)} for every fact (exact when the
    keys are independent, which needs d_ff ≥ N·R).
  'train': W from zero by Adam on the squared loss ½‖W h − i_{r(x)}‖² of every fact (the
    loss the theory's edits use; cross-entropy would let the logits grow without bound, and
    a squared-loss edit would then have to undo that scale). Recall is exact only up to the
    optimisation error, so W h ≈ i_old rather than equal.
  """
  if method not in _READOUTS:
    raise ValueError(f"fit_readout method={method!r} is not one of {list(_READOUTS)}")
  cfg = model.cfg
  if table_RxN.shape != (cfg.n_relations, cfg.n_entities):
    raise ValueError(f"table has shape {table_RxN.shape}; expected "
                     f"(n_relations, n_entities)=({cfg.n_relations}, {cfg.n_entities})")
  entity, relation, target = all_facts(table_RxN)
  _check_index("table", target, cfg.n_entities)
  h = hidden(model, entity, relation)
  if method == "lstsq":
    return one_hot(target, cfg.n_entities).T @ np.linalg.pinv(h.T)
  if key is None:
    raise ValueError("fit_readout(method='train') needs a PRNG key")
  validate.integer("steps", steps, 1)
  validate.number("learning_rate", learning_rate, 0, low_open=True)
  return _train_readout(h, target, cfg.n_entities, steps, learning_rate)


def _train_readout(h_MxF, target_M, n, steps, learning_rate) -> np.ndarray:
  with jax.enable_x64(True):
    h = jnp.asarray(h_MxF)
    t = jnp.asarray(target_M)
    opt = optax.adam(learning_rate)

    def loss(w):
      resid = h @ w.T - jax.nn.one_hot(t, n, dtype=jnp.float64)
      return 0.5 * jnp.mean(jnp.sum(resid * resid, axis=1))

    def step(carry, _):
      w, state = carry
      g = jax.grad(loss)(w)
      upd, state = opt.update(g, state, w)
      return (optax.apply_updates(w, upd), state), None

    @jax.jit
    def run(w):
      (w, _), _ = jax.lax.scan(step, (w, opt.init(w)), None, length=steps)
      return w

    return _np(run(jnp.zeros((n, h.shape[1]), jnp.float64)))


# ----------------------------------------------------------------------------------------
# Edits: closed forms and LoRA trained by gradient descent.


def rank_one_edit(h_F: np.ndarray, new: int, old: int, n: int) -> np.ndarray:
  """Proposition 1: ΔW = (i_new − i_old) hᵀ / ‖h‖², [N, F]."""
  h_F = np.asarray(h_F, np.float64)
  norm2 = float(h_F @ h_F)
  if norm2 == 0.0:
    raise ValueError("rank_one_edit: the key h is zero (a dead ReLU key cannot be edited)")
  return np.outer(one_hot(new, n) - one_hot(old, n), h_F) / norm2


def min_norm_edit(w_NxF: np.ndarray, h_MxF: np.ndarray, target_M) -> np.ndarray:
  """The minimum-Frobenius-norm ΔW with (W + ΔW) h_j = i_{t_j} for every key (exact when the
  keys are independent): ΔW = (T_new − W K) K⁺, K = [h_1 … h_m] — which is the paper's
  (T_new − T_old) K⁺ when W recalls the old facts exactly (W K = T_old)."""
  d_NxM = one_hot(target_M, w_NxF.shape[0]).T - w_NxF @ h_MxF.T
  return d_NxM @ np.linalg.pinv(h_MxF.T)


def best_rank_edit(w_NxF: np.ndarray, h_MxF: np.ndarray, target_M, rank: int) -> np.ndarray:
  """The rank-≤r ΔW minimising ‖(W + ΔW) K − T_new‖_F, of least norm: [D]_r K⁺, where
  D = T_new − W K and [D]_r is its truncated SVD (Eckart–Young; K of full column rank)."""
  d_NxM = one_hot(target_M, w_NxF.shape[0]).T - w_NxF @ h_MxF.T
  u, s, vt = np.linalg.svd(d_NxM, full_matrices=False)
  d_r = (u[:, :rank] * s[:rank]) @ vt[:rank]
  return d_r @ np.linalg.pinv(h_MxF.T)


def balanced_factors(delta_NxF: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """(b [N, r], a [F, r]) with b aᵀ the best rank-r approximation, σ split evenly (√σ)."""
  u, s, vt = np.linalg.svd(delta_NxF, full_matrices=False)
  root = np.sqrt(s[:rank])
  return u[:, :rank] * root, vt[:rank].T * root


def numerical_rank(delta: np.ndarray, rtol: float = 1e-9) -> int:
  s = np.linalg.svd(delta, compute_uv=False)
  return int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0


@dataclasses.dataclass(frozen=True)
class GDConfig:
  """Plain full-batch gradient descent on ½‖(W + b aᵀ) K − T_new‖²_F.

  learning_rate is relative: the step is learning_rate / (σ_max(K) · σ_max(T_new − W K)).
  init: 'small' draws a, b ~ N(0, init_scale²) (the regime of Proposition 1); 'peft' draws
  a ~ U(±1/√F) and b = 0 (the usual LoRA initialisation, not small).
  """

  steps: int = 2000
  learning_rate: float = 0.2
  init_scale: float = 1e-3
  init: str = "small"
  record_every: int = 50

  def __post_init__(self):
    validate.integer("GDConfig.steps", self.steps, 1)
    validate.integer("GDConfig.record_every", self.record_every, 1)
    validate.number("GDConfig.learning_rate", self.learning_rate, 0, low_open=True)
    validate.number("GDConfig.init_scale", self.init_scale, 0, low_open=True)
    validate.choice("GDConfig.init", self.init, ("small", "peft"))


@dataclasses.dataclass(frozen=True, eq=False)
class LoraFit:
  """A LoRA trained by gradient descent: ΔW = b aᵀ; `loss_T` is the loss after every step;
  the factors at `history_steps` are kept in `history_b_SxNxR`, `history_a_SxFxR` (empty
  unless the history was asked for); `history_deltas()` gives the ΔW's."""

  b_NxR: np.ndarray
  a_FxR: np.ndarray
  loss_T: np.ndarray
  history_steps: np.ndarray
  history_b_SxNxR: np.ndarray
  history_a_SxFxR: np.ndarray

  @property
  def delta(self) -> np.ndarray:
    return self.b_NxR @ self.a_FxR.T

  def history_deltas(self) -> np.ndarray:
    """ΔW at each recorded step, [S, N, F]."""
    return np.einsum("snr,sfr->snf", self.history_b_SxNxR, self.history_a_SxFxR)


def check_rank(rank, n: int, f: int, owner: str = "rank"):
  validate.integer(owner, rank, 1)
  if rank > min(n, f):
    raise ValueError(f"{owner}={rank} is larger than min(n_entities, d_ff)={min(n, f)}")


def train_lora(key: jax.Array, w_NxF: np.ndarray, h_MxF: np.ndarray, target_M, *,
               rank: int, gd: GDConfig = GDConfig(), keep_history: bool = False) -> LoraFit:
  """A rank-r LoRA on W trained by gradient descent (float64) to map each key to its target.
  keep_history stores the factors every `gd.record_every` steps (for convergence plots)."""
  n, f = w_NxF.shape
  check_rank(rank, n, f)
  return _train_many(key, w_NxF, h_MxF, target_M, rank, gd, np.ones((1, rank)),
                     keep_history)[0]


def train_lora_ranks(key: jax.Array, w_NxF: np.ndarray, h_MxF: np.ndarray, target_M,
                     ranks: list[int], gd: GDConfig = GDConfig()) -> list[LoraFit]:
  """One LoRA per rank in `ranks`, trained together (one compile, vmapped over rank masks)."""
  n, f = w_NxF.shape
  for r in ranks:
    check_rank(r, n, f, "ranks[i]")
  top = max(ranks)
  masks = np.stack([(np.arange(top) < r).astype(np.float64) for r in ranks])
  fits = _train_many(key, w_NxF, h_MxF, target_M, top, gd, masks, keep_history=False)
  return [LoraFit(x.b_NxR[:, :r], x.a_FxR[:, :r], x.loss_T, x.history_steps,
                  x.history_b_SxNxR[..., :r], x.history_a_SxFxR[..., :r])
          for x, r in zip(fits, ranks)]


def _train_many(key, w_NxF, h_MxF, target_M, rank, gd: GDConfig, masks_CxR,
                keep_history: bool) -> list[LoraFit]:
  """Masked columns (mask 0) stay at zero: a rank-r' LoRA in rank-r shapes, so that several
  ranks train in one vmapped, jitted call."""
  n, f = w_NxF.shape
  if h_MxF.ndim != 2 or h_MxF.shape[1] != f:
    raise ValueError(f"keys have shape {h_MxF.shape}; expected [M, d_ff={f}]")
  target = np.asarray(target_M)
  _check_index("target", target, n)
  d_NxM = one_hot(target, n).T - w_NxF @ h_MxF.T
  scale = np.linalg.norm(h_MxF, 2) * max(np.linalg.norm(d_NxM, 2), 1e-12)
  lr = gd.learning_rate / scale
  n_rec = gd.steps // gd.record_every
  with jax.enable_x64(True):
    k_a, k_b = jax.random.split(key)
    if gd.init == "small":
      a0 = gd.init_scale * jax.random.normal(k_a, (f, rank), jnp.float64)
      b0 = gd.init_scale * jax.random.normal(k_b, (n, rank), jnp.float64)
    else:
      bound = 1.0 / math.sqrt(f)
      a0 = jax.random.uniform(k_a, (f, rank), jnp.float64, -bound, bound)
      b0 = jnp.zeros((n, rank), jnp.float64)
    out = _gd_many(jnp.asarray(h_MxF), jnp.asarray(d_NxM), a0, b0, jnp.asarray(masks_CxR),
                   jnp.asarray(lr), steps=gd.steps, record_every=gd.record_every,
                   keep_history=keep_history)
    a, b, losses, snap_a, snap_b = (_np(x) for x in out)
  if keep_history:
    steps = np.arange(1, n_rec + 1) * gd.record_every
  else:
    c = masks_CxR.shape[0]
    steps, snap_a, snap_b = np.zeros(0, np.int64), np.zeros((c, 0, f, rank)), np.zeros((c, 0, n, rank))
  return [LoraFit(b[i], a[i], losses[i], steps, snap_b[i], snap_a[i])
          for i in range(masks_CxR.shape[0])]


@functools.partial(jax.jit, static_argnames=("steps", "record_every", "keep_history"))
def _gd_many(h_MxF, d_NxM, a0_FxR, b0_NxR, masks_CxR, lr, *, steps: int, record_every: int,
             keep_history: bool):
  """Gradient descent on ½‖b aᵀ hᵀ − D‖²_F (keys h as rows) for each rank mask, vmapped;
  module-level so repeated calls with the same shapes reuse one compilation."""
  n_rec = steps // record_every

  def loss(a, b):
    resid = b @ (h_MxF @ a).T - d_NxM  # [N, M]
    return 0.5 * jnp.sum(resid * resid)

  def one(mask):
    def step(carry, _):
      a, b = carry
      ga, gb = jax.grad(loss, argnums=(0, 1))(a, b)
      a, b = a - lr * ga * mask, b - lr * gb * mask
      return (a, b), loss(a, b)

    def chunk(carry, _):
      carry, losses = jax.lax.scan(step, carry, None, length=record_every)
      a, b = carry
      if not keep_history:
        a, b = a[:0], b[:0]
      return carry, (losses, a, b)

    init = (a0_FxR * mask, b0_NxR * mask)
    (a, b), (losses, snap_a, snap_b) = jax.lax.scan(chunk, init, None, length=n_rec)
    losses = losses.reshape(-1)
    rest = steps - n_rec * record_every
    if rest:
      (a, b), more = jax.lax.scan(step, (a, b), None, length=rest)
      losses = jnp.concatenate([losses, more])
    return a, b, losses, snap_a, snap_b

  return jax.vmap(one)(masks_CxR)


# ----------------------------------------------------------------------------------------
# Arrow routing in the toy (Ostapenko et al. 2024): one prototype per expert.


def arrow_prototypes(deltas_KxNxF: np.ndarray) -> np.ndarray:
  """Prototype of each expert: the top right singular vector of its ΔW (in key space), [K, F].
  The sign is arbitrary, which is why Arrow scores |⟨v, h⟩|."""
  return np.stack([np.linalg.svd(d, full_matrices=False)[2][0] for d in deltas_KxNxF])


def arrow_weights(protos_KxF: np.ndarray, h_MxF: np.ndarray, *, top_k: int = 1,
                  temperature: float = 1.0) -> np.ndarray:
  """Per-prompt weights [M, K]: scores |⟨v_k, h⟩| / temperature, the top-k kept and
  softmax-normalised, the rest 0."""
  k = protos_KxF.shape[0]
  validate.integer("top_k", top_k, 1, k)
  validate.number("temperature", temperature, 0, low_open=True)
  scores = np.abs(h_MxF @ protos_KxF.T) / temperature
  kth = np.sort(scores, axis=1)[:, -top_k][:, None]
  masked = np.where(scores >= kth, scores, -np.inf)
  masked -= masked.max(axis=1, keepdims=True)
  e = np.exp(masked)
  return e / e.sum(axis=1, keepdims=True)


def routed_logits(w_NxF: np.ndarray, deltas_KxNxF: np.ndarray, weights_MxK: np.ndarray,
                  h_MxF: np.ndarray) -> np.ndarray:
  """Logits with per-prompt mixed updates: W h + Σ_k w_k ΔW_k h, [M, N]."""
  per_expert = np.einsum("knf,mf->mkn", deltas_KxNxF, h_MxF)
  return logits(w_NxF, h_MxF) + np.einsum("mk,mkn->mn", weights_MxK, per_expert)
