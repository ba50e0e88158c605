"""Our flavor='peft' merges reproduce PEFT's `add_weighted_adapter` on the same adapters.

A tiny torch model of two nn.Linear layers gets two LoRA adapters with random A and B; PEFT
stores lora_A [r, in] and lora_B [out, r], we store a = lora_A^T [in, r], b = lora_B^T
[r, out], so PEFT's merged delta [out, in] must equal the transpose of ours. DARE's random
drops are made identical by replacing PEFT's `random_pruning` with a deterministic keep-mask
(a function of each entry's value) and passing the same masks to our merge.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax.numpy as jnp  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

from lora_limits import lora as lora_lib  # noqa: E402
from lora_limits.recycle import merge as merge_lib  # noqa: E402

LAYERS = {"lin1": (6, 5), "lin2": (5, 7)}  # name: (in, out)


class Tiny(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.lin1 = torch.nn.Linear(6, 5, bias=False)
    self.lin2 = torch.nn.Linear(5, 7, bias=False)

  def forward(self, x):
    return self.lin2(self.lin1(x))


def _keep_mask_np(x: np.ndarray, density: float) -> np.ndarray:
  y = np.abs(x.astype(np.float32)) * np.float32(1000.0)
  return (y - np.floor(y)) < density


def _deterministic_random_pruning(tensor, density, rescale):
  y = tensor.abs() * 1000.0
  keep = (y - torch.floor(y)) < density
  out = tensor * keep
  return out / density if rescale else out


def _build(specs, seed=0):
  """PEFT model with adapters 'a0', 'a1', ... of (r, alpha) and our matching adapters."""
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  model = Tiny()
  ours = []
  for k, (r, alpha) in enumerate(specs):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LAYERS),
                          init_lora_weights=False)
    if k == 0:
      model = peft.get_peft_model(model, cfg, adapter_name="a0")
    else:
      model.add_adapter(f"a{k}", cfg)
    adapter = {}
    for name, (d_in, d_out) in LAYERS.items():
      a = rng.normal(size=(d_in, r)).astype(np.float32)
      b = rng.normal(size=(r, d_out)).astype(np.float32)
      layer = getattr(model.base_model.model, name)
      with torch.no_grad():
        layer.lora_A[f"a{k}"].weight.copy_(torch.from_numpy(a.T.copy()))
        layer.lora_B[f"a{k}"].weight.copy_(torch.from_numpy(b.T.copy()))
      adapter[f"{name}/kernel"] = lora_lib.LoraFactors(jnp.asarray(a), jnp.asarray(b), alpha / r)
    ours.append(adapter)
  return model, ours


def _peft_delta(model, adapter_name):
  return {f"{name}/kernel": getattr(model.base_model.model, name)
          .get_delta_weight(adapter_name).detach().numpy().T for name in LAYERS}


def _check(model, ours, combination_type, weights, **kwargs):
  names = [f"a{k}" for k in range(len(ours))]
  model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type,
                             **kwargs)
  theirs = _peft_delta(model, "merged")
  opts = {}
  if "density" in kwargs:
    opts["density"] = kwargs["density"]
  if "majority_sign_method" in kwargs:
    opts["majority_sign"] = kwargs["majority_sign_method"]
  if "svd_rank" in kwargs:
    opts["svd_rank"] = kwargs["svd_rank"]
  if combination_type.startswith("dare") and kwargs.get("density", 1.0) < 1.0:
    d = kwargs["density"]
    opts["masks"] = {
        p: (np.stack([_keep_mask_np(np.asarray(ad[p].a), d) for ad in ours]),
            np.stack([_keep_mask_np(np.asarray(ad[p].b), d) for ad in ours]))
        for p in ours[0]}
  result = merge_lib.merge(ours, combination_type, weights, flavor="peft", **opts)
  mine = result.delta()
  for p in theirs:
    np.testing.assert_allclose(np.asarray(mine[p]), theirs[p], rtol=2e-5, atol=2e-5,
                               err_msg=f"{combination_type} at {p}")
  return result


@pytest.mark.parametrize("combination_type,kwargs", [
    ("linear", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.7}),
])
def test_factorwise_methods_match_peft(monkeypatch, combination_type, kwargs):
  monkeypatch.setattr(merge_utils, "random_pruning", _deterministic_random_pruning)
  model, ours = _build([(3, 6.0), (3, 3.0)])
  _check(model, ours, combination_type, [0.7, -1.3], **kwargs)


@pytest.mark.parametrize("combination_type,kwargs", [
    ("cat", {}),
    ("svd", {"svd_rank": 2}),
    ("svd", {}),
    ("ties_svd", {"density": 0.5, "svd_rank": 3}),
    ("magnitude_prune_svd", {"density": 0.4, "svd_rank": 3}),
])
def test_mixed_rank_methods_match_peft(combination_type, kwargs):
  model, ours = _build([(2, 4.0), (3, 6.0)], seed=1)
  result = _check(model, ours, combination_type, [1.2, -0.4], **kwargs)
  if combination_type == "cat":
    assert result.adapter["lin1/kernel"].rank == 5
  else:
    assert result.adapter["lin1/kernel"].rank == kwargs.get("svd_rank", 3)


def test_linear_is_not_the_weighted_sum_of_updates():
  """PEFT's `linear` combines factors (cross terms), unlike our default `uniform_delta`."""
  _, ours = _build([(3, 6.0), (3, 3.0)], seed=2)
  peft_d = merge_lib.merge(ours, "linear", [0.5, 0.5], flavor="peft").delta()
  sum_d = merge_lib.merge(ours, "uniform_delta", [0.5, 0.5]).delta()
  p = "lin1/kernel"
  assert not np.allclose(np.asarray(peft_d[p]), np.asarray(sum_d[p]), atol=1e-3)


@pytest.mark.parametrize("rslora", [False, True])
def test_single_adapter_weight_one_is_identity_including_rslora(rslora):
  """PEFT 0.21 scales this case by √r under rsLoRA (peft#3449, #3761); our flavour does not."""
  _, ours = _build([(4, 8.0)], seed=3)
  if rslora:  # rsLoRA scale alpha/√r
    ours = [{p: lora_lib.LoraFactors(f.a, f.b, 8.0 / 2.0) for p, f in ours[0].items()}]
  want = lora_lib.delta(ours[0])
  for ct in ("linear", "cat", "svd", "ties"):
    got = merge_lib.merge(ours, ct, [1.0], flavor="peft").delta()
    for p in want:
      np.testing.assert_allclose(np.asarray(got[p]), np.asarray(want[p]), rtol=1e-5, atol=1e-5)


# Every combination type of PEFT 0.21's add_weighted_adapter, with three adapters of mixed
# alphas (scales 2, 0.5, 3), negative and non-unit weights, and unequal ranks wherever PEFT
# accepts them (it requires one rank for the factor-wise types).
ALL_COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear",
                         "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
                         "magnitude_prune_svd")
SAME_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")


def test_the_parity_list_is_peft_s_list_and_our_registry():
  import inspect
  import re
  hint = inspect.signature(peft.LoraModel.add_weighted_adapter).parameters["combination_type"]
  text = hint.annotation if isinstance(hint.annotation, str) else repr(hint.annotation)
  assert set(re.findall(r"['\"](\w+)['\"]", text)) == set(ALL_COMBINATION_TYPES)
  assert set(merge_lib.PEFT_METHODS) == set(ALL_COMBINATION_TYPES)
  assert {m for m, i in merge_lib.PEFT_METHODS.items() if not i.mixed_ranks} == set(
      SAME_RANK_TYPES)


@pytest.mark.parametrize("combination_type", ALL_COMBINATION_TYPES)
def test_every_combination_type_matches_peft(monkeypatch, combination_type):
  weights = [0.8, -1.1, 0.6]
  recorded = []

  def recording_pruning(tensor, density, rescale):
    """PEFT's DARE drop, made deterministic (a function of each entry); records the masks."""
    y = tensor.abs() * 1000.0
    keep = (y - torch.floor(y)) < density
    recorded.append(keep.numpy().copy())
    out = tensor * keep
    return out / density if rescale else out

  monkeypatch.setattr(merge_utils, "random_pruning", recording_pruning)
  same_rank = combination_type in SAME_RANK_TYPES
  ranks = (3, 3, 3) if same_rank else (2, 4, 3)
  alphas = (2.0 * ranks[0], 0.5 * ranks[1], 3.0 * ranks[2])  # scales 2, 0.5, 3
  model, ours = _build(list(zip(ranks, alphas)), seed=11)
  assert len({f.scale for ad in ours for f in [ad["lin1/kernel"]]}) == 3
  kwargs = {}
  if combination_type not in ("linear", "cat", "svd"):
    kwargs["density"] = 0.6
  if combination_type.endswith("svd"):
    kwargs["svd_rank"] = 4
  names = [f"a{k}" for k in range(3)]
  model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type,
                             **kwargs)
  theirs = _peft_delta(model, "merged")
  opts = dict(kwargs)
  if combination_type.startswith("dare"):
    if combination_type.endswith("_svd"):  # masks on the dense updates, [out, in] per module
      assert len(recorded) == 3 * len(LAYERS)
      opts["masks"] = {f"{name}/kernel": np.stack([m.T for m in recorded[3 * i:3 * i + 3]])
                       for i, name in enumerate(LAYERS)}
    else:  # masks on the factors, a function of their (exactly shared) values
      opts["masks"] = {
          p: (np.stack([_keep_mask_np(np.asarray(ad[p].a), 0.6) for ad in ours]),
              np.stack([_keep_mask_np(np.asarray(ad[p].b), 0.6) for ad in ours]))
          for p in ours[0]}
  result = merge_lib.merge(ours, combination_type, weights, flavor="peft", **opts)
  mine = result.delta()
  for p in theirs:
    scale = max(1.0, float(np.abs(theirs[p]).max()))
    np.testing.assert_allclose(np.asarray(mine[p]), theirs[p], rtol=0, atol=5e-5 * scale,
                               err_msg=f"{combination_type} at {p}")
  if not same_rank:  # the merged rank PEFT allocates
    want = sum(ranks) if combination_type == "cat" else 4
    assert result.adapter["lin1/kernel"].rank == want


@pytest.mark.parametrize("combination_type", SAME_RANK_TYPES)
def test_factorwise_types_refuse_unequal_ranks_like_peft(combination_type):
  model, ours = _build([(2, 4.0), (3, 3.0)], seed=12)
  with pytest.raises(ValueError, match="same r value"):
    model.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "merged",
                               combination_type=combination_type, density=0.5)
  with pytest.raises(ValueError, match="needs equal ranks"):
    merge_lib.merge(ours, combination_type, [1.0, 1.0], flavor="peft", density=0.5)
