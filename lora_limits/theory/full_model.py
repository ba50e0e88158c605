"""The theory's quantities for adapters of the full model (issue 5, item 6).

For adapters `dict[path, LoraFactors]` of `lora_limits.models.transformer`:
  * the singular spectrum and numerical rank of each update ΔW = s·A B ([d_in, d_out]);
  * principal angles between two experts' *read* spaces (the column space of ΔW in R^d_in:
    the inputs it responds to, spanned by A — what Arrow's prototypes live in) and *write*
    spaces (the row space in R^d_out: what it adds, spanned by Bᵀ);
  * at every adapted layer, the overlap coefficients of Theorem 2,
    c_k,i = ⟨x_k,i, x_2hop,i⟩/‖x_k,i‖², between the layer's input on expert k's own one-hop
    prompt of chain i and on the two-hop prompt of the same chain (last prompt token, where
    the answer is produced), plus the trigger ratio ‖x_2hop,i ΔW_k‖/‖x_k,i ΔW_k‖: how strongly
    expert k's update fires on the two-hop prompt compared with its own prompt.

Layer inputs come from the model's own forward (`transformer.apply(..., capture=paths)`),
so nothing here re-implements the model. Results are NumPy float64 in typed records.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_limits import lora as lora_lib
from lora_limits.models import transformer
from lora_limits.theory.statements import jsonable


def _to_dict(record) -> dict[str, Any]:
  return {f.name: jsonable(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _check_factors(path: str, f: lora_lib.LoraFactors):
  if f.a.ndim != 2 or f.b.ndim != 2:
    raise ValueError(f"adapter at {path!r} has a {tuple(f.a.shape)}, b {tuple(f.b.shape)}: "
                     "expected one adapter (2-D factors), not a stack")


def update_svd(f: lora_lib.LoraFactors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(read basis [d_in, r], σ [r], write basis [d_out, r]) of ΔW = s·A B, in float64, from
  the factors (QR of A and Bᵀ, then the SVD of an r×r core) — the dense ΔW is never formed."""
  a = np.asarray(f.a, np.float64)
  b = np.asarray(f.b, np.float64)
  q_a, r_a = np.linalg.qr(a)
  q_b, r_b = np.linalg.qr(b.T)
  u, s, vt = np.linalg.svd(f.scale * r_a @ r_b.T)
  return q_a @ u, s, q_b @ vt.T


@dataclasses.dataclass(frozen=True, eq=False)
class SpectrumRecord:
  """The spectrum of one update. numerical_rank counts σ > rtol·σ_max; stable rank is
  ‖ΔW‖²_F/‖ΔW‖²_2; effective rank is exp(entropy of σ/Σσ) (Roy & Vetterli, 2007)."""

  path: str
  d_in: int
  d_out: int
  nominal_rank: int
  singular_values: np.ndarray
  numerical_rank: int
  rtol: float
  stable_rank: float
  effective_rank: float
  top1_energy: float  # σ_1²/Σσ²

  def to_dict(self) -> dict[str, Any]:
    return _to_dict(self)


def default_rtol(f: lora_lib.LoraFactors) -> float:
  """max(d_in, d_out)·eps of the factors' dtype (NumPy's matrix_rank convention)."""
  eps = float(jnp.finfo(f.a.dtype).eps)
  return max(f.a.shape[0], f.b.shape[1]) * eps


def spectrum(path: str, f: lora_lib.LoraFactors, rtol: float | None = None) -> SpectrumRecord:
  _check_factors(path, f)
  rtol = default_rtol(f) if rtol is None else float(rtol)
  if not rtol >= 0:
    raise ValueError(f"rtol must be >= 0, got {rtol!r}")
  _, s, _ = update_svd(f)
  top = float(s[0]) if s.size else 0.0
  energy = float(np.sum(s ** 2))
  if top > 0:
    p = s / s.sum()
    p = p[p > 0]
    eff = float(np.exp(-np.sum(p * np.log(p))))
    stable, top1 = energy / top ** 2, top ** 2 / energy
  else:
    eff = stable = top1 = 0.0
  return SpectrumRecord(path=path, d_in=int(f.a.shape[0]), d_out=int(f.b.shape[1]),
                        nominal_rank=int(f.rank), singular_values=s,
                        numerical_rank=int(np.sum(s > rtol * top)) if top > 0 else 0,
                        rtol=rtol, stable_rank=stable, effective_rank=eff, top1_energy=top1)


def spectra(adapter: Mapping[str, lora_lib.LoraFactors],
            rtol: float | None = None) -> dict[str, SpectrumRecord]:
  """{path: SpectrumRecord} for every adapted kernel."""
  return {p: spectrum(p, f, rtol) for p, f in sorted(adapter.items())}


def principal_angles(q1: np.ndarray, q2: np.ndarray) -> np.ndarray:
  """Principal angles (radians, ascending) between the spans of two orthonormal bases."""
  if q1.shape[0] != q2.shape[0]:
    raise ValueError(f"bases live in different spaces: {q1.shape[0]} vs {q2.shape[0]} rows")
  cos = np.linalg.svd(q1.T @ q2, compute_uv=False)
  return np.arccos(np.clip(cos, -1.0, 1.0))


@dataclasses.dataclass(frozen=True, eq=False)
class AngleRecord:
  """Principal angles between experts i and j at one path, over their top-`dim` singular
  directions. overlap = mean cos² (1: same subspace; for random subspaces ≈ dim/d, given as
  the baseline)."""

  path: str
  expert_i: str
  expert_j: str
  dim: int
  read_angles_deg: np.ndarray
  write_angles_deg: np.ndarray
  read_overlap: float
  write_overlap: float
  read_random_baseline: float
  write_random_baseline: float

  def to_dict(self) -> dict[str, Any]:
    return _to_dict(self)


def subspace_angles(path: str, f_i: lora_lib.LoraFactors, f_j: lora_lib.LoraFactors, *,
                    dim: int | None = None, rtol: float | None = None,
                    names: tuple[str, str] = ("0", "1")) -> AngleRecord:
  """Angles between the read spaces and between the write spaces of two updates at `path`;
  dim defaults to the smaller numerical rank (at least 1)."""
  _check_factors(path, f_i)
  _check_factors(path, f_j)
  if f_i.a.shape[0] != f_j.a.shape[0] or f_i.b.shape[1] != f_j.b.shape[1]:
    raise ValueError(f"adapters at {path!r} adapt kernels of different shapes")
  read_i, _, write_i = update_svd(f_i)
  read_j, _, write_j = update_svd(f_j)
  if dim is None:
    dim = max(1, min(spectrum(path, f_i, rtol).numerical_rank,
                     spectrum(path, f_j, rtol).numerical_rank))
  limit = min(f_i.rank, f_j.rank)
  if not isinstance(dim, (int, np.integer)) or not 1 <= dim <= limit:
    raise ValueError(f"dim={dim!r} must be an int in [1, {limit}] (the smaller adapter rank)")
  ra = principal_angles(read_i[:, :dim], read_j[:, :dim])
  wa = principal_angles(write_i[:, :dim], write_j[:, :dim])
  d_in, d_out = read_i.shape[0], write_i.shape[0]
  return AngleRecord(path=path, expert_i=names[0], expert_j=names[1], dim=int(dim),
                     read_angles_deg=np.degrees(ra), write_angles_deg=np.degrees(wa),
                     read_overlap=float(np.mean(np.cos(ra) ** 2)),
                     write_overlap=float(np.mean(np.cos(wa) ** 2)),
                     read_random_baseline=dim / d_in, write_random_baseline=dim / d_out)


# ----------------------------------------------------------------------------------------
# Layer inputs through the model's own forward.


def layer_inputs(params: Mapping[str, Any], cfg: transformer.ModelConfig, tokens_BxT,
                 paths: Sequence[str]) -> dict[str, np.ndarray]:
  """{path: the input x [B, T, d_in] of that kernel} from one forward pass of the model.
  Pass merged params (e.g. `lora.merge(params, adapter)`) for inputs under an adapter."""
  if not paths:
    raise ValueError("layer_inputs needs at least one kernel path")
  _, aux = transformer.apply(params, cfg, jnp.asarray(tokens_BxT), capture=paths)
  return {p: np.asarray(x, np.float64) for p, x in aux["captured"].items()}


def _check_prompts(name: str, prompts: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  if "tokens" not in prompts or "prompt_len" not in prompts:
    raise ValueError(f"{name} must be an encoded dataset with 'tokens' and 'prompt_len', got "
                     f"keys {sorted(prompts)}")
  tokens = np.asarray(prompts["tokens"])
  plen = np.asarray(prompts["prompt_len"])
  if tokens.ndim != 2 or plen.shape != (tokens.shape[0],):
    raise ValueError(f"{name}: tokens {tokens.shape} and prompt_len {plen.shape} do not match")
  if plen.size and (plen.min() < 1 or plen.max() > tokens.shape[1]):
    raise ValueError(f"{name}: prompt_len must be in [1, {tokens.shape[1]}], got "
                     f"[{plen.min()}, {plen.max()}]")
  return tokens, plen


def last_prompt_inputs(params, cfg: transformer.ModelConfig, prompts: Mapping[str, np.ndarray],
                       paths: Sequence[str], name: str = "prompts") -> dict[str, np.ndarray]:
  """{path: x [N, d_in]} at each row's last prompt token (where the answer is produced)."""
  tokens, plen = _check_prompts(name, prompts)
  width = int(plen.max())
  inputs = layer_inputs(params, cfg, tokens[:, :width], paths)
  rows = np.arange(tokens.shape[0])
  return {p: x[rows, plen - 1] for p, x in inputs.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class OverlapRecord:
  """Theorem 2's overlaps at one adapted layer, per expert k and chain i.

  c_KxN = ⟨x_k,i, x_2hop,i⟩/‖x_k,i‖²; cosine_KxN the same as a cosine; c_other_K the mean c
  against the *other* chains' one-hop inputs (the baseline a shared direction gives);
  trigger_KxN = ‖x_2hop,i ΔW_k‖/‖x_k,i ΔW_k‖ (NaN where expert k does not adapt this path).
  """

  path: str
  c_KxN: np.ndarray
  cosine_KxN: np.ndarray
  c_other_K: np.ndarray
  trigger_KxN: np.ndarray

  def summary(self) -> dict[str, list[float]]:
    return {"c_mean": np.mean(self.c_KxN, axis=1).tolist(),
            "c_other_mean": self.c_other_K.tolist(),
            "cosine_mean": np.mean(self.cosine_KxN, axis=1).tolist(),
            "trigger_mean": np.mean(self.trigger_KxN, axis=1).tolist()}

  def to_dict(self) -> dict[str, Any]:
    return {**_to_dict(self), "summary": jsonable(self.summary())}


def overlap_coefficients(params, cfg: transformer.ModelConfig,
                         adapters: Sequence[Mapping[str, lora_lib.LoraFactors]],
                         one_hop_prompts: Sequence[Mapping[str, np.ndarray]],
                         two_hop_prompts: Mapping[str, np.ndarray]) -> dict[str, OverlapRecord]:
  """{path: OverlapRecord} at every path adapted by any of the adapters.

  one_hop_prompts[k] holds expert k's own prompts, row i of each aligned with row i of
  two_hop_prompts (chain i: e.g. "A REL1" for expert 1, "B REL2" for expert 2, and
  "A REL1 REL2"). Inputs are the base model's (`params`).
  """
  if len(one_hop_prompts) != len(adapters):
    raise ValueError(f"one_hop_prompts has {len(one_hop_prompts)} sets for {len(adapters)} "
                     "adapters; give one set per adapter")
  n = _check_prompts("two_hop_prompts", two_hop_prompts)[0].shape[0]
  for k, pr in enumerate(one_hop_prompts):
    rows = _check_prompts(f"one_hop_prompts[{k}]", pr)[0].shape[0]
    if rows != n:
      raise ValueError(f"one_hop_prompts[{k}] has {rows} rows, two_hop_prompts {n}: rows must "
                       "be aligned chain by chain")
  paths = sorted(set().union(*[set(ad) for ad in adapters]))
  x2 = last_prompt_inputs(params, cfg, two_hop_prompts, paths, "two_hop_prompts")
  xs = [last_prompt_inputs(params, cfg, pr, paths, f"one_hop_prompts[{k}]")
        for k, pr in enumerate(one_hop_prompts)]
  out = {}
  for p in paths:
    h2 = x2[p]
    c, cos, c_other, trig = [], [], [], []
    for k, ad in enumerate(adapters):
      h = xs[k][p]
      norm2 = np.sum(h * h, axis=1)
      dots = h2 @ h.T  # [i (two-hop), j (one-hop)]
      c.append(np.diag(dots) / norm2)
      cos.append(np.diag(dots) / np.sqrt(norm2 * np.sum(h2 * h2, axis=1)))
      off = ~np.eye(n, dtype=bool)
      c_other.append(float(np.mean((dots / norm2[None, :])[off])) if n > 1 else math.nan)
      if p in ad:
        f = ad[p]
        a, b = np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)
        fire = lambda x: np.linalg.norm(f.scale * (x @ a) @ b, axis=1)  # noqa: E731
        trig.append(fire(h2) / np.maximum(fire(h), 1e-300))
      else:
        trig.append(np.full(n, math.nan))
    out[p] = OverlapRecord(p, np.stack(c), np.stack(cos), np.array(c_other), np.stack(trig))
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class FullModelReport:
  names: list[str]
  spectra: dict[str, dict[str, SpectrumRecord]]  # name → path → record
  angles: list[AngleRecord]  # every pair of experts, every shared path
  overlaps: dict[str, OverlapRecord] | None

  def to_dict(self) -> dict[str, Any]:
    return {"names": list(self.names),
            "spectra": {n: {p: r.to_dict() for p, r in s.items()} for n, s in self.spectra.items()},
            "angles": [a.to_dict() for a in self.angles],
            "overlaps": None if self.overlaps is None else
            {p: r.to_dict() for p, r in self.overlaps.items()}}


def analyse_adapters(params, cfg: transformer.ModelConfig,
                     adapters: Sequence[Mapping[str, lora_lib.LoraFactors]], *,
                     names: Sequence[str] | None = None,
                     one_hop_prompts: Sequence[Mapping[str, np.ndarray]] | None = None,
                     two_hop_prompts: Mapping[str, np.ndarray] | None = None,
                     rtol: float | None = None, angle_dim: int | None = None) -> FullModelReport:
  """Spectra of every adapter, principal angles for every pair at their shared paths and, if
  prompts are given, the overlap coefficients at every adapted layer."""
  if not adapters:
    raise ValueError("analyse_adapters needs at least one adapter")
  names = [str(i) for i in range(len(adapters))] if names is None else [str(n) for n in names]
  if len(names) != len(adapters) or len(set(names)) != len(names):
    raise ValueError(f"names={names!r} must be {len(adapters)} distinct names, one per adapter")
  if (one_hop_prompts is None) != (two_hop_prompts is None):
    raise ValueError("give both one_hop_prompts and two_hop_prompts, or neither")
  for k, ad in enumerate(adapters):
    if not ad:
      raise ValueError(f"adapter {names[k]!r} adapts no kernel")
    lora_lib.check_compatible(params, ad)
    for p, f in ad.items():
      _check_factors(p, f)
  spec = {n: spectra(ad, rtol) for n, ad in zip(names, adapters)}
  angles = []
  for i in range(len(adapters)):
    for j in range(i + 1, len(adapters)):
      for p in sorted(set(adapters[i]) & set(adapters[j])):
        angles.append(subspace_angles(p, adapters[i][p], adapters[j][p], dim=angle_dim,
                                      rtol=rtol, names=(names[i], names[j])))
  overlaps = None
  if one_hop_prompts is not None:
    overlaps = overlap_coefficients(params, cfg, adapters, one_hop_prompts, two_hop_prompts)
  return FullModelReport(names, spec, angles, overlaps)
