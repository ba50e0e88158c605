"""PEFT LoRA adapters in and out of our adapter pytrees.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with
tensors `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r];
the update of `<module>` is ΔW = s · B A with s = alpha / r (alpha / √r with `use_rslora`),
where r and alpha come from `rank_pattern` / `alpha_pattern` when a pattern matches the
module name (PEFT's rule: the first key k with `re.match(rf"(.*\\.)?({k})$", module)`), else
from `r` / `lora_alpha`. Ours is a = Aᵀ [in, r], b = Bᵀ [r, out], scale s.

GPT-2's q, k and v are one fused Conv1D, `attn.c_attn` [d, 3d]. A PEFT adapter on it
(A [r, d], B [3d, r]) loads *exactly* as three adapters on our q/k/v kernels that share
a = Aᵀ, with b split by columns. The other way, our q/k/v adapters become one c_attn
adapter: if they share the same `a` (as when loaded from PEFT) and scale, at rank r with B
their concatenated b's; otherwise at rank r_q + r_k + r_v with A their stacked a's and B
block-diagonal (absent parts are zero blocks), scales folded into B. Both are exact; the
second costs rank. Nothing is refused for GPT-2 except adapters on modules we cannot adapt.

Refused with a ValueError rather than loaded wrongly: other PEFT types, DoRA, `lora_bias`,
`bias != "none"`, `modules_to_save`, embedding or lm_head adapters (our forward adapts
only the linear layers of the blocks), base-rewriting initialisations (PiSSA, OLoRA,
CorDA, LoftQ, LoRA-GA, MiCA) and the other LoRA variants PEFT has (aLoRA, QALoRA, ...).
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from lora_limits import lora as lora_lib
from lora_limits import tree as tree_lib
from lora_limits.interop import hf
from lora_limits.interop import safetensors_io

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight")

# Config fields that turn on something other than plain LoRA; truthy means refuse.
_VARIANT_FIELDS = ("use_dora", "lora_bias", "modules_to_save", "layer_replication",
                   "trainable_token_indices", "alora_invocation_tokens", "use_qalora",
                   "target_parameters", "use_bdlora", "arrow_config", "kasa_config",
                   "monteclora_config", "velora_config", "megatron_config")
# init_lora_weights values under which the saved factors assume a rewritten base model.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
  """PEFT's rank_pattern / alpha_pattern lookup for one module name."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_config(config: Mapping[str, Any], where: str):
  # Types of the fields we read (a hand-edited or damaged config fails here by name).
  if not (isinstance(config.get("r", 8), int) and not isinstance(config.get("r", 8), bool)
          and config.get("r", 8) > 0):
    raise ValueError(f"{where}: r={config.get('r')!r} must be a positive int")
  if not _is_number(config.get("lora_alpha", 8)):
    raise ValueError(f"{where}: lora_alpha={config.get('lora_alpha')!r} must be a number")
  for name in ("rank_pattern", "alpha_pattern"):
    pattern = config.get(name) or {}
    if not isinstance(pattern, dict) or not all(
        isinstance(k, str) and _is_number(v) for k, v in pattern.items()):
      raise ValueError(f"{where}: {name}={config.get(name)!r} must map module-name patterns to "
                       "numbers")
    for key in pattern:
      try:
        re.compile(key)
      except re.error as e:
        raise ValueError(f"{where}: {name} key {key!r} is not a valid regex ({e})") from e
  if not isinstance(config.get("use_rslora", False), (bool, type(None))):
    raise ValueError(f"{where}: use_rslora={config.get('use_rslora')!r} must be a bool")
  peft_type = config.get("peft_type")
  if peft_type != "LORA":
    raise ValueError(f"{where}: peft_type={peft_type!r} is not supported (only 'LORA')")
  for field in _VARIANT_FIELDS:
    if config.get(field):
      raise ValueError(
          f"{where}: {field}={config[field]!r} is not supported (plain LoRA only; loading it "
          "would drop part of the adapter)")
  if config.get("bias", "none") != "none":
    raise ValueError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
  init = str(config.get("init_lora_weights", True)).lower()
  if init.startswith(_BASE_REWRITING_INITS):
    raise ValueError(
        f"{where}: init_lora_weights={config['init_lora_weights']!r} adapters are relative to a "
        "rewritten base model; convert them to plain LoRA with PEFT first "
        "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")


def read_adapter(path: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray, float]]]:
  """(adapter_config, {HF module name: (A [r, in], B [out, r], scale)}) of a PEFT directory."""
  path = pathlib.Path(path)
  where = f"PEFT adapter at {str(path)!r}"
  if not (path / CONFIG_FILE).exists():
    raise ValueError(f"{where} has no {CONFIG_FILE}")
  if not (path / WEIGHTS_FILE).exists():
    raise ValueError(f"{where} has no {WEIGHTS_FILE} (only safetensors adapters are supported)")
  config = safetensors_io.read_json(path / CONFIG_FILE)
  if not isinstance(config, dict):
    raise ValueError(f"{where}: {CONFIG_FILE} must hold a JSON object")
  _check_config(config, where)
  factors: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  with safetensors_io.SafetensorsCheckpoint(path) as ckpt:
    for key in ckpt.keys():
      m = _KEY.fullmatch(key)
      if not m:
        kind = ("an embedding adapter" if "lora_embedding" in key else
                "a DoRA magnitude" if "magnitude" in key else "not a LoRA factor")
        raise ValueError(f"{where}: tensor {key!r} is {kind}; not supported")
      factors[m.group(1)][m.group(2)] = ckpt.read(key)
  r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
  rank_pattern = config.get("rank_pattern") or {}
  alpha_pattern = config.get("alpha_pattern") or {}
  out = {}
  for module, ab in sorted(factors.items()):
    if set(ab) != {"lora_A", "lora_B"}:
      raise ValueError(f"{where}: module {module!r} has only {sorted(ab)}")
    a, b = ab["lora_A"], ab["lora_B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      raise ValueError(f"{where}: {module!r} has lora_A {a.shape} and lora_B {b.shape}; "
                       "expected [r, in] and [out, r]")
    r = a.shape[0]
    expected = pattern_value(rank_pattern, module, r_default)
    if r != expected:
      raise ValueError(f"{where}: {module!r} has rank {r}, its config says {expected}")
    alpha = float(pattern_value(alpha_pattern, module, alpha_default))
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    out[module] = (a, b, scale)
  return config, out


def load_adapter(path: str | pathlib.Path, params: Mapping[str, Any]) -> lora_lib.Adapter:
  """Our adapter ({kernel path: LoraFactors}) from a PEFT LoRA directory, checked to fit
  `params` (factors cast to the kernels' dtype). The architecture (Llama-family or GPT-2)
  is read from the module names."""
  _, modules = read_adapter(path)
  flat = tree_lib.flatten(params)
  adapter: lora_lib.Adapter = {}
  for module, (a_RxI, b_OxR, scale) in modules.items():
    if module.removeprefix(_PREFIX).split(".")[-1] == "lm_head":
      raise ValueError(f"adapter on {module!r} is not supported: our forward adapts only the "
                       "linear layers inside the blocks")
    _, paths = hf.kernel_paths(module)
    a = a_RxI.T
    b_parts = np.split(b_OxR.T, len(paths), axis=1)
    for path, b in zip(paths, b_parts):
      dtype = flat[path].dtype if path in flat else jnp.float32
      adapter[path] = lora_lib.LoraFactors(jnp.asarray(a, dtype), jnp.asarray(b, dtype), scale)
  lora_lib.check_compatible(params, adapter)
  return adapter


def _fuse_qkv(parts: dict[int, lora_lib.LoraFactors], d_out: int | None):
  """One c_attn adapter (a [d, r], b [r, 3·d_out], scale) exactly equal to q/k/v parts."""
  present = [parts[i] for i in sorted(parts)]
  if d_out is None:
    d_out = present[0].b.shape[1]
  same_a = len(parts) == 3 and all(
      f.a.shape == present[0].a.shape and np.array_equal(f.a, present[0].a) for f in present)
  if same_a and all(f.scale == present[0].scale for f in present):
    return present[0].a, np.concatenate([f.b for f in present], axis=1), present[0].scale
  a = np.concatenate([f.a for f in present], axis=1)
  b = np.zeros((a.shape[1], 3 * d_out), np.result_type(*[f.b for f in present]))
  row = 0
  for i in sorted(parts):
    f = parts[i]
    b[row:row + f.rank, i * d_out:(i + 1) * d_out] = f.b * f.scale
    row += f.rank
  return a, b, 1.0


def save_adapter(adapter: Mapping[str, lora_lib.LoraFactors], path: str | pathlib.Path, *,
                 arch: str = "llama", base_model_name_or_path: str | None = None,
                 num_layers: int | None = None, fold_scale: bool = False,
                 dtype: str = "float32") -> dict[str, Any]:
  """Write `adapter` as a PEFT LoRA directory that `PeftModel.from_pretrained` loads with the
  same outputs; returns the adapter_config written.

  arch: module naming ('llama', 'qwen2', 'mistral' share it; 'gpt2' fuses q/k/v, see the
    module docstring). Any adapter works, merged ones included: the most common
    (rank, alpha) become `r` / `lora_alpha`, the rest go to `rank_pattern` / `alpha_pattern`
    with exact module names, alpha = scale · rank. num_layers: the base model's depth; when
    every layer has the same adapted kinds, target_modules is written as short names
    (['q_proj', 'v_proj']), else as a regex of the exact module names. fold_scale: multiply
    each scale into B and write lora_alpha = r.
  """
  hf._check_arch(arch)
  path = pathlib.Path(path)
  modules: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
  fused: dict[str, dict[int, lora_lib.LoraFactors]] = collections.defaultdict(dict)
  for p, f in sorted(adapter.items()):
    if f.a.ndim != 2 or f.b.ndim != 2:
      raise ValueError(f"adapter at {p!r} is stacked (a {tuple(f.a.shape)}); save each adapter "
                       "separately (lora.unstack)")
    name, part = hf.module_name(p, arch)
    host = lora_lib.LoraFactors(np.asarray(jax.device_get(f.a), np.float32),
                                np.asarray(jax.device_get(f.b), np.float32), float(f.scale))
    if arch == "gpt2" and name.endswith("attn.c_attn"):
      fused[name][part] = host
    else:
      modules[name] = (host.a, host.b, host.scale)
  for name, parts in fused.items():
    modules[name] = _fuse_qkv(parts, None)
  if not modules:
    raise ValueError("save_adapter got an empty adapter")
  tensors, ranks, alphas = {}, {}, {}
  for name, (a, b, scale) in sorted(modules.items()):
    if fold_scale:
      b, scale = b * scale, 1.0
    r = a.shape[1]
    ranks[name], alphas[name] = r, _number(scale * r)
    tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T.astype(dtype))
    tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T.astype(dtype))
  (r, alpha), _ = collections.Counter(zip(ranks.values(), alphas.values())).most_common(1)[0]
  rank_pattern = {re.escape(n): v for n, v in ranks.items() if v != r}
  alpha_pattern = {re.escape(n): v for n, v in alphas.items() if v != alpha}
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
      "target_modules": _target_modules(sorted(modules), arch, num_layers), "use_rslora": False,
      "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": arch == "gpt2",
      "init_lora_weights": True, "inference_mode": True, "use_dora": False,
      "lora_bias": False, "modules_to_save": None,
  }
  path.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
  (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return config


def _number(x: float) -> int | float:
  return int(round(x)) if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)) else float(x)


def _target_modules(names: list[str], arch: str, num_layers: int | None) -> list[str] | str:
  """Suffixes (`q_proj`, or `attn.c_proj` where GPT-2's `c_proj` alone would be ambiguous)
  when every one of `num_layers` layers adapts the same kinds, else a full-match regex of
  the exact module names: PEFT would add zero LoRA layers wherever a suffix matched a module
  without weights, and warn about the missing keys."""
  prefix = hf.LAYER_PREFIX[arch] + "."
  kinds = set((hf.GPT2_MODULES if arch == "gpt2" else hf.LLAMA_MODULES).values())
  short = {k: k.rsplit(".", 1)[-1] for k in kinds}
  counts = collections.Counter(short.values())
  suffix = {k: short[k] if counts[short[k]] == 1 else k for k in kinds}
  layers: dict[str, set[int]] = collections.defaultdict(set)
  for n in names:
    layer, kind = n.removeprefix(prefix).split(".", 1)
    layers[kind].add(int(layer))
  if num_layers is not None and all(v == set(range(num_layers)) for v in layers.values()):
    return sorted(suffix[k] for k in layers)
  return "|".join(re.escape(n) for n in names)
