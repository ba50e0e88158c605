"""Study 'recycle_peft': a practitioner's own PEFT LoRA adapters, base model and questions.

Run:
  python -m experiments.run --config=configs/recycle_peft.py --workdir=W \\
      --config.base=CHECKPOINT_DIR --config.adapters=A_DIR,B_DIR --config.eval=questions.jsonl

Loads the base (`interop.hf.load_checkpoint`: Llama/Qwen2/Mistral/GPT-2; `dtype`, and FSDP
sharding over every device with `shard=True`) and each adapter (`interop.peft.load_adapter`),
then evaluates the base, every adapter alone and every method of the recycler registry
(`lora_limits.recycle.recyclers`, so a newly registered recycler is one here too) that fits:
the merges (PEFT's `add_weighted_adapter` combination types as `peft_<type>`; by default the
zoo's own merges only where PEFT has no such type, e.g. WUDI) and the routers (Arrow,
GenKnowSub + Arrow with `general` adapters; LoraHub and similarity selection with `fewshot`
data) on the questions of `eval`: teacher-forced exact match (the greedy continuation starts with the answer) and the
answer's log-likelihood. Before evaluating, the pre-flight diagnostics (`lora_limits.preflight`,
from the weights alone; `preflight=False` skips them) predict each merge's and Arrow's
retention of every adapter. Writes `config.json`, `preflight.json`, `results.jsonl` (one record
per method and group; a method's record of all questions carries its `preflight` summary),
`report.md` (with a pre-flight section: predicted retention beside measured exact match),
`figures/`, `timings.json` and, with `export=METHOD`, that merge as a PEFT adapter directory
`export/METHOD/` (loads with `PeftModel.from_pretrained`).

Input problems (a missing or malformed file, an adapter of another model, methods that do
not apply to these adapters) are `schema.ConfigError`s naming the field, the file and what is
allowed, raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import schema
from lora_limits import data as data_lib
from lora_limits import exact_match as eval_lib
from lora_limits import lora as lora_lib
from lora_limits import preflight as preflight_lib
from lora_limits import sharding as shard_lib
from lora_limits import tokenizer as tok_lib
from lora_limits import tree as tree_lib
from lora_limits.interop import hf
from lora_limits.interop import peft as ipeft
from lora_limits.interop import qa as qa_lib
from lora_limits.interop import safetensors_io
from lora_limits.models import transformer
from lora_limits.recycle import merge as merge_lib
from lora_limits.recycle import recyclers
from lora_limits.recycle import route as route_lib

PROVIDED = frozenset({"shots", "centroids", "general"})  # no gold labels for user questions
SAME_MODULES = frozenset({"arrow", "genknowsub"})  # route between adapters per layer
FACTORWISE = frozenset({"lorahub", "genknowsub"})  # registered recyclers that combine A, B
DTYPES = ("float32", "bfloat16")


def methods() -> dict[str, recyclers.Recycler]:
  """{name: Recycler}: the registry's methods this study can run (read at call time)."""
  return {n: r for n, r in recyclers.registry().items() if r.needs <= PROVIDED}


def default_methods() -> list[str]:
  """Every method, PEFT flavour: a merge that PEFT has too runs as `peft_<type>` only."""
  return [n for n in methods() if not (n in merge_lib.METHODS and n in merge_lib.PEFT_METHODS)]


def exportable() -> list[str]:
  """The methods whose result is one LoRA adapter."""
  return [n for n, r in methods().items() if r.gives_adapter]


@dataclasses.dataclass(frozen=True)
class RecyclePeftStudy:
  """Paths are checked when the inputs are read (`load_inputs`), also before any compute."""

  study: str = "recycle_peft"
  base: str = ""  # a local Hugging Face checkpoint directory
  adapters: str = ""  # comma-separated PEFT LoRA adapter directories
  eval: str = ""  # JSONL: {"prompt", "answer"[, "group"]} per line
  fewshot: str = ""  # optional JSONL, same format, disjoint from eval (LoraHub, similarity)
  general: str = ""  # optional comma-separated general adapters (GenKnowSub)
  methods: tuple[str, ...] = ()  # () = every method that applies, PEFT flavour
  export: str = ""  # a merge method whose adapter is written to <workdir>/export/<method>/
  weights: tuple[float, ...] = ()  # one merge weight per adapter; () = each merge's default
  dtype: str = "float32"
  shard: bool = False  # FSDP-shard the base over every device
  batch_size: int = 16
  answer_eos: bool = False  # also require EOS right after the answer
  density: float = 0.5  # ties / dare / magnitude_prune
  svd_rank: int = 0  # PEFT *svd rank; 0 = the largest adapter rank
  arrow_top_k: int = 1
  arrow_temperature: float = 1.0
  lorahub_generations: int = 10
  similarity_top_k: int = 1
  seed: int = 0
  preflight: bool = True  # predict each merge's and Arrow's retention from the weights first
  erase_below: float = 0.5  # pre-flight: a predicted retention below this erases an adapter

  def __post_init__(self):
    if self.study != "recycle_peft":
      raise ValueError(f"config.study must be 'recycle_peft', got {self.study!r}")
    table = methods()
    for m in self.methods:
      if m not in table:
        raise ValueError(f"config.methods has {m!r}; allowed: {sorted(table)}")
    if len(set(self.methods)) != len(self.methods):
      raise ValueError(f"config.methods repeats a method: {self.methods}")
    if self.export and not (self.export in table and table[self.export].gives_adapter):
      if self.export in merge_lib.METHODS:
        why = "a merge into dense updates, which does not produce a mergeable adapter"
      elif self.export in table:
        why = ("a router, which mixes adapters per token or query and does not produce a "
               "mergeable adapter")
      else:
        why = "not a method"
      raise ValueError(f"config.export={self.export!r} is {why}; allowed: '' or one of "
                       f"{exportable()}")
    if self.dtype not in DTYPES:
      raise ValueError(f"config.dtype={self.dtype!r} is not one of {list(DTYPES)}")
    for name in ("batch_size", "arrow_top_k", "lorahub_generations", "similarity_top_k"):
      if getattr(self, name) <= 0:
        raise ValueError(f"config.{name} must be > 0, got {getattr(self, name)!r}")
    for name in ("svd_rank", "seed"):
      if getattr(self, name) < 0:
        raise ValueError(f"config.{name} must be >= 0, got {getattr(self, name)!r}")
    if not 0.0 < self.density <= 1.0:
      raise ValueError(f"config.density must be in (0, 1], got {self.density!r}")
    if not self.arrow_temperature > 0:
      raise ValueError(f"config.arrow_temperature must be > 0, got {self.arrow_temperature!r}")
    if not 0.0 < self.erase_below < 1.0:
      raise ValueError(f"config.erase_below must be in (0, 1), got {self.erase_below!r}")


def parse(config: Any) -> RecyclePeftStudy:
  """The ConfigDict → a validated RecyclePeftStudy (ConfigError names the field)."""
  return schema.build(RecyclePeftStudy, config, "config")


def split_paths(value: str) -> list[str]:
  return [p.strip() for p in value.split(",") if p.strip()]


# ------------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
  """Everything read from the user's files, checked."""

  cfg: transformer.ModelConfig
  arch: str
  params: Any
  tokenizer: Any
  names: list[str]  # one per adapter (directory name, made unique)
  adapters: list[lora_lib.Adapter]  # zero-padded to the union of target modules
  targets: list[list[str]]  # each adapter's own kernel paths
  general: list[lora_lib.Adapter]
  eval_qa: list[qa_lib.QA]
  eval_rows: data_lib.Encoded
  fewshot_qa: list[qa_lib.QA]
  fewshot_rows: data_lib.Encoded | None
  weights: tuple[float, ...] | None  # None: each merge's default
  methods: list[str]
  skipped: dict[str, str]  # method -> why it does not apply
  pad_id: int


def _error(field: str, message: str) -> schema.ConfigError:
  return schema.ConfigError(f"config.{field}: {message}")


def _family(arch: str) -> str:
  return "gpt2" if arch == "gpt2" else "llama"


def _read_adapter(field: str, index: int, path: str, params, arch: str) -> lora_lib.Adapter:
  where = f"{field}[{index}]={path!r}"
  if not pathlib.Path(path).is_dir():
    raise _error(field, f"{where} is not a directory (expected a PEFT adapter directory with "
                 f"{ipeft.CONFIG_FILE} and {ipeft.WEIGHTS_FILE})")
  try:
    config, modules = ipeft.read_adapter(path)
    for module in modules:
      family, _ = hf.kernel_paths(module)
      if family != _family(arch):
        raise ValueError(f"it adapts {module!r}, a {family} module, but config.base is a "
                         f"{arch} checkpoint")
    adapter = ipeft.load_adapter(path, params)
  except ValueError as e:
    trained_on = None
    if (pathlib.Path(path) / ipeft.CONFIG_FILE).is_file():
      try:
        trained_on = safetensors_io.read_json(pathlib.Path(path) / ipeft.CONFIG_FILE).get(
            "base_model_name_or_path")
      except (ValueError, AttributeError):
        trained_on = None
    hint = f" (its adapter_config.json names the base {trained_on!r})" if trained_on else ""
    raise _error(field, f"{where} does not fit config.base: {e}{hint}") from e
  return adapter


def _pad_to_union(adapters: list[lora_lib.Adapter]) -> list[lora_lib.Adapter]:
  """Every adapter on the union of paths; a path an adapter lacks gets zero factors (of the
  rank another adapter has there): exactly what PEFT's add_weighted_adapter does with a
  module an adapter does not target (it skips it, i.e. adds nothing)."""
  union = sorted(set().union(*adapters))
  out = []
  for ad in adapters:
    padded = dict(ad)
    for p in union:
      if p not in ad:
        ref = next(other[p] for other in adapters if p in other)
        padded[p] = lora_lib.LoraFactors(jnp.zeros_like(ref.a), jnp.zeros_like(ref.b), 1.0)
    out.append(padded)
  return out


def _encode(field: str, qas: Sequence[qa_lib.QA], tokenizer, cfg: transformer.ModelConfig,
            answer_eos: bool) -> data_lib.Encoded:
  pairs = []
  for q in qas:
    where = f"{q.source}: line {q.line}"
    try:
      prompt = tok_lib.prompt_ids(tokenizer, q.prompt)
      answer = tok_lib.encode_text(tokenizer, q.answer)
    except ValueError as e:
      raise _error(field, f"{where}: {e}") from e
    if not answer:
      raise _error(field, f"{where}: the answer {q.answer!r} encodes to no tokens")
    if not prompt:
      raise _error(field, f"{where}: the prompt {q.prompt!r} encodes to no tokens")
    if cfg.pos == "learned" and len(prompt) + len(answer) + 1 > cfg.max_len:
      raise _error(field, f"{where}: {len(prompt) + len(answer) + 1} tokens exceed the base "
                   f"model's {cfg.max_len} positions")
    pairs.append((prompt, answer))
  rows = data_lib.encode(pairs, eos_id=tokenizer.eos_token_id, pad_id=tok_lib.pad_id(tokenizer))
  if not answer_eos:  # score the answer tokens only, not the EOS after them
    rows["answer_len"] = rows["answer_len"] - 1
  return rows


def _mesh(study: RecyclePeftStudy):
  if not study.shard:
    return None
  return shard_lib.fsdp_mesh()


def _mixed_ranks(method: str) -> bool:
  """Whether `method` accepts adapters of different ranks at a module."""
  if method in merge_lib.METHODS:
    return merge_lib.METHODS[method].mixed_ranks
  peft_name = method.removeprefix(recyclers.PEFT_PREFIX)
  if method.startswith(recyclers.PEFT_PREFIX) and peft_name in merge_lib.PEFT_METHODS:
    return merge_lib.PEFT_METHODS[peft_name].mixed_ranks
  return method not in FACTORWISE


def why_not(method: str, *, same_paths: bool, same_ranks: bool, has_fewshot: bool,
            general_fits: str | None, has_general: bool) -> str | None:
  """Why `method` does not apply to the adapters (None: it does)."""
  needs = recyclers.get(method).needs
  if needs & {"shots", "centroids"} and not has_fewshot:
    return "needs few-shot data (config.fewshot)"
  if "general" in needs:
    if not has_general:
      return "needs general adapters (config.general)"
    if general_fits:
      return general_fits
  if method in SAME_MODULES and not same_paths:
    return "needs adapters with the same target modules (Arrow routes between them per layer)"
  if not same_ranks and not _mixed_ranks(method):
    return "needs adapters of equal rank at every module (it combines A and B factor-wise)"
  return None


def load_inputs(study: RecyclePeftStudy) -> Inputs:
  """Read and check every input file (ConfigError naming the field and file)."""
  for field in ("base", "adapters", "eval"):
    if not getattr(study, field):
      raise _error(field, "is required (" + {
          "base": "a local Hugging Face checkpoint directory",
          "adapters": "comma-separated PEFT LoRA adapter directories",
          "eval": "a JSONL file with one {\"prompt\": ..., \"answer\": ...} per line"}[field]
          + ")")
  for field in ("eval", "fewshot"):
    path = getattr(study, field)
    if path and not pathlib.Path(path).is_file():
      raise _error(field, f"{path!r} is not a file; expected a JSONL file with one "
                   '{"prompt": ..., "answer": ...[, "group": ...]} object per line')
  try:
    eval_qa = qa_lib.read(study.eval)
  except ValueError as e:
    raise _error("eval", str(e)) from e
  fewshot_qa = []
  if study.fewshot:
    try:
      fewshot_qa = qa_lib.read(study.fewshot)
    except ValueError as e:
      raise _error("fewshot", str(e)) from e
    shared = qa_lib.overlap(eval_qa, fewshot_qa)
    if shared:
      x, y = shared[0]
      raise _error("fewshot", f"{y.source}: line {y.line} asks the same prompt as {x.source}: "
                   f"line {x.line} ({len(shared)} shared prompts); few-shot data must be "
                   "disjoint from the evaluation questions")
  paths = split_paths(study.adapters)
  if len(set(paths)) != len(paths):
    raise _error("adapters", f"lists a directory twice: {paths}")
  if study.weights and len(study.weights) != len(paths):
    raise _error("weights", f"has {len(study.weights)} weights for {len(paths)} adapters; give "
                 "one per adapter (or () for 1.0 each)")
  base = pathlib.Path(study.base)
  if not (base / "config.json").is_file():
    raise _error("base", f"{study.base!r} is not a checkpoint directory with a config.json")
  try:
    cfg, params, tokenizer = hf.load_checkpoint(base, study.dtype, _mesh(study))
    arch = hf.infer_arch(cfg)
  except ValueError as e:
    raise _error("base", f"{study.base!r}: {e}") from e
  if tokenizer.eos_token_id is None:
    raise _error("base", f"the tokenizer in {study.base!r} has no EOS token")
  own = [_read_adapter("adapters", i, p, params, arch) for i, p in enumerate(paths)]
  general_own = [_read_adapter("general", i, p, params, arch)
                 for i, p in enumerate(split_paths(study.general))]
  targets = [sorted(ad) for ad in own]
  flat = tree_lib.flatten(params)
  smallest = min(min(flat[p].shape) for t in targets for p in t)
  if study.svd_rank > smallest:
    raise _error("svd_rank", f"{study.svd_rank} exceeds {smallest}, the smallest dimension of an "
                 "adapted kernel")
  same_paths = all(t == targets[0] for t in targets)
  adapters = _pad_to_union(own)
  same_ranks = all(len({ad[p].rank for ad in adapters}) == 1 for p in adapters[0])
  general_fits = None
  if general_own:
    everything = own + general_own
    if any(sorted(ad) != targets[0] for ad in everything):
      general_fits = "needs general adapters with the task adapters' target modules"
    elif not all(len({ad[p].rank for ad in everything}) == 1 for p in targets[0]):
      general_fits = ("needs general adapters of the task adapters' rank (PEFT subtracts the "
                      "mean A and B factor-wise)")
  reasons = {m: why_not(m, same_paths=same_paths, same_ranks=same_ranks,
                        has_fewshot=bool(fewshot_qa), general_fits=general_fits,
                        has_general=bool(general_own)) for m in methods()}
  applicable = [m for m in methods() if reasons[m] is None]
  if study.methods:
    for m in study.methods:
      if reasons[m] is not None:
        raise _error("methods", f"{m!r} does not apply: it {reasons[m]}; methods that apply to "
                     f"these adapters: {applicable}")
    chosen = list(study.methods)
  else:
    chosen = [m for m in default_methods() if reasons[m] is None]
  if study.export and reasons[study.export] is not None:
    raise _error("export", f"{study.export!r} does not apply: it {reasons[study.export]}; "
                 f"exportable methods that apply: {[m for m in exportable() if m in applicable]}")
  if study.export and study.export not in chosen:
    chosen.append(study.export)
  pad_id = tok_lib.pad_id(tokenizer)  # the pad token, else EOS (LoraHub's rows pad alike)
  eval_rows = _encode("eval", eval_qa, tokenizer, cfg, study.answer_eos)
  fewshot_rows = (_encode("fewshot", fewshot_qa, tokenizer, cfg, study.answer_eos)
                  if fewshot_qa else None)
  names = []
  for p in paths:
    name = pathlib.Path(p).resolve().name or "adapter"
    names.append(name if name not in names else f"{name}_{len(names)}")
  weights = tuple(float(w) for w in study.weights) or None
  return Inputs(cfg, arch, params, tokenizer, names, adapters, targets, general_own, eval_qa,
                eval_rows, fewshot_qa, fewshot_rows, weights, chosen,
                {m: r for m, r in reasons.items() if r is not None}, pad_id)


# ------------------------------------------------------------------------------- models


def _single(adapter: lora_lib.Adapter) -> lora_lib.LoraMix:
  """A one-adapter mix with the scale folded into b: the scale is static jit metadata, so
  adapters of one rank then share a compilation whatever their alpha."""
  return lora_lib.LoraMix.single(lora_lib.fold_scale(adapter))


@dataclasses.dataclass
class Model:
  name: str
  kind: str  # base | single | merge | router
  recycled: recyclers.Recycled
  data_free: bool = True
  extra: dict = dataclasses.field(default_factory=dict)


def method_options(study: RecyclePeftStudy, method: str, num_adapters: int,
                   num_fewshot: int) -> dict[str, Any]:
  """The registry options of `method` that the config sets (the others keep their defaults)."""
  accepts = recyclers.get(method).options
  opts: dict[str, Any] = {}
  if "density" in accepts and method.removeprefix(recyclers.PEFT_PREFIX) not in (
      "linear", "cat", "svd"):
    opts["density"] = study.density
  for name in ("svd_rank", "rank"):
    if name in accepts and study.svd_rank:
      opts[name] = study.svd_rank
  if "top_k" in accepts:
    top_k = study.similarity_top_k if method == "similarity" else study.arrow_top_k
    opts["top_k"] = min(top_k, num_adapters)
  if "temperature" in accepts:
    opts["temperature"] = study.arrow_temperature
  if "generations" in accepts:
    opts["generations"] = study.lorahub_generations
  if "shots" in accepts and num_fewshot:
    opts["shots"] = num_fewshot
  return opts


def resources(study: RecyclePeftStudy, inputs: Inputs,
              centroids: jax.Array | None = None) -> recyclers.Resources:
  return recyclers.Resources(
      params=inputs.params, cfg=inputs.cfg, adapters=tuple(inputs.adapters),
      names=tuple(inputs.names), seed=study.seed, tokenizer=inputs.tokenizer,
      shots=tuple(inputs.fewshot_qa), centroids=centroids, general=tuple(inputs.general),
      weights=inputs.weights)


def recycle(study: RecyclePeftStudy, inputs: Inputs, method: str,
            res: recyclers.Resources | None = None) -> recyclers.Recycled:
  """Runs registry method `method` on the inputs."""
  return recyclers.recycle(method, res or resources(study, inputs), method_options(
      study, method, len(inputs.adapters), len(inputs.fewshot_qa)))


def merged_adapter(study: RecyclePeftStudy, inputs: Inputs, method: str) -> lora_lib.Adapter:
  """The adapter a merge method gives (ValueError for a method that makes none)."""
  adapter = recycle(study, inputs, method).adapter
  if adapter is None:
    raise ValueError(f"{method!r} does not produce a mergeable adapter")
  return adapter


def _centroids(study: RecyclePeftStudy, inputs: Inputs) -> tuple[jax.Array, list[int]]:
  """[K, D] centroids of the few-shot prompts each adapter answers best (lowest answer NLL);
  an adapter that wins none gets a zero centroid (cosine 0 with every query)."""
  rows = inputs.fewshot_rows
  losses = np.stack([
      eval_lib.teacher_forced(inputs.params, inputs.cfg, rows, lora=_single(ad),
                              batch_size=study.batch_size, pad_id=inputs.pad_id)["loss"]
      for ad in inputs.adapters])  # [K, N]
  best = np.argmin(losses, axis=0)
  chunks = [slice(i, i + study.batch_size) for i in range(0, len(best), study.batch_size)]
  emb = np.concatenate([np.asarray(route_lib.prompt_embeddings(
      inputs.params, inputs.cfg, jnp.asarray(rows["tokens"][c]),
      jnp.asarray(rows["prompt_len"][c]))) for c in chunks])
  cents = np.zeros((len(inputs.adapters), emb.shape[1]), np.float32)
  counts = []
  for k in range(len(inputs.adapters)):
    chosen = best == k
    counts.append(int(chosen.sum()))
    if chosen.any():
      cents[k] = emb[chosen].mean(0)
  return jnp.asarray(cents), counts


def build_models(study: RecyclePeftStudy, inputs: Inputs) -> Iterator[Model]:
  """The base, each adapter alone, then each method (built one at a time, as iterated, so
  that one merged copy of the base is alive at once)."""
  yield Model("base", "base", recyclers.Recycled(inputs.params))
  for name, ad in zip(inputs.names, inputs.adapters):
    yield Model(f"adapter:{name}", "single", recyclers.Recycled(inputs.params, mix=_single(ad)),
                extra={"rank": max(f.rank for f in ad.values())})
  table = recyclers.registry()
  extra_of = {}
  cents = None
  if any("centroids" in table[m].needs for m in inputs.methods):
    cents, counts = _centroids(study, inputs)
    extra_of["centroids"] = {"fewshot_wins": counts}
  res = resources(study, inputs, cents)
  for method in inputs.methods:
    entry = table[method]
    recycled = recycle(study, inputs, method, res)
    extra = dict(recycled.extra)
    for need in entry.needs:
      extra.update(extra_of.get(need, {}))
    routed = recycled.mix is not None or recycled.route is not None
    if method in merge_lib.METHODS or method.startswith(recyclers.PEFT_PREFIX):
      extra["flavor"] = "default" if method in merge_lib.METHODS else "peft"
    if recycled.adapter is not None:
      extra["rank"] = max(f.rank for f in recycled.adapter.values())
    yield Model(method, "router" if routed else "merge", recycled, entry.data_free, extra)


# ---------------------------------------------------------------------------- pre-flight


def preflight_specs(study: RecyclePeftStudy, inputs: Inputs
                    ) -> tuple[list[preflight_lib.MethodConfig], dict[str, str]]:
  """The chosen methods the pre-flight predicts (every merge, with the options, weights and
  key its recycler uses, so it scores the very merge that is evaluated; Arrow), and why the
  others are not predicted."""
  specs, skipped = [], {}
  k = len(inputs.adapters)
  for m in inputs.methods:
    flavor = "peft" if m.startswith(recyclers.PEFT_PREFIX) else "default"
    name = m.removeprefix(recyclers.PEFT_PREFIX) if flavor == "peft" else m
    if m == "arrow":
      specs.append(preflight_lib.MethodConfig(m, "arrow", {
          "top_k": min(study.arrow_top_k, k), "temperature": study.arrow_temperature}))
    elif name in (merge_lib.PEFT_METHODS if flavor == "peft" else merge_lib.METHODS):
      info = merge_lib.method_info(name, flavor)
      options = recyclers.get(m).resolve(method_options(study, m, k, len(inputs.fewshot_qa)))
      if info.random:
        options["key"] = jax.random.key(study.seed)
      specs.append(preflight_lib.MethodConfig(m, name, options, inputs.weights, flavor))
    else:
      skipped[m] = ("a data-driven or per-query method: the pre-flight predicts data-free "
                    "merges and Arrow only")
  return specs, skipped


def run_preflight(study: RecyclePeftStudy, inputs: Inputs) -> dict[str, Any]:
  """`preflight.check_library` on the adapters and the chosen methods, from the weights alone:
  {"methods": {method: {retention, probe_retention, capacity | router, detail}}, "verdicts",
  "bridge", "capacity", "baselines", "adapters", "not_predicted": {method: why}}."""
  specs, skipped = preflight_specs(study, inputs)
  out = preflight_lib.check_library(
      inputs.params, dict(zip(inputs.names, inputs.adapters)), specs,
      erase_below=study.erase_below, head_dim=inputs.cfg.resolved_head_dim,
      activation=inputs.cfg.activation)
  out["not_predicted"] = skipped
  return out


def preflight_summary(entry: Mapping[str, Any], erase_below: float) -> dict[str, Any]:
  """What a method's results record carries of its pre-flight entry."""
  ret = entry["retention"]
  out: dict[str, Any] = {"retention": dict(ret), "min_retention": min(ret.values()),
                         "erases": sorted(a for a, r in ret.items() if r < erase_below)}
  if "probe_retention" in entry:
    out["probe_retention"] = dict(entry["probe_retention"])
    out["min_probe_retention"] = min(entry["probe_retention"].values())
  if "capacity" in entry:
    out["capacity_ratio"] = entry["capacity"]["min_ratio"]
  if "router" in entry:
    out["routing_entropy"] = entry["router"]["routing_entropy"]
    out["self_weight"] = dict(entry["router"]["self_weight"])
  return out


def preflight_section(preflight: Mapping[str, Any] | None, skipped_reason: str | None,
                      records: Sequence[Mapping[str, Any]], erase_below: float) -> list[str]:
  """report.md's pre-flight section: predicted retention next to the measured exact match."""
  lines = ["", "## Pre-flight: predicted retention", ""]
  if preflight is None:
    return lines + [f"Not run: {skipped_reason}."]
  lines += [f"From the weights alone, before any evaluation (`lora_limits/preflight.py`): "
            "how much of each adapter's own update a method keeps on that adapter's keys "
            "(1: all of it; below "
            f"{erase_below} the adapter counts as erased), and on probe inputs drawn from the "
            "base model's embeddings. Measured exact match beside it.", ""]
  names = preflight["adapters"]
  lines += ["| method | min retention | " + " | ".join(names) + " | min probe retention | "
            "capacity | exact match |", "|---|---|" + "---|" * len(names) + "---|---|---|"]
  measured = {r["method"]: r["exact_match"] for r in records if r["group"] == "all"}
  for m, entry in preflight["methods"].items():
    s = preflight_summary(entry, erase_below)
    probe = f"{s['min_probe_retention']:.2f}" if "min_probe_retention" in s else "–"
    cap = f"{s['capacity_ratio']:.2f}" if "capacity_ratio" in s else "router"
    em = f"{measured[m]:.3f}" if m in measured else "–"
    lines.append(f"| {m} | {s['min_retention']:.2f} | " + " | ".join(
        f"{s['retention'][n]:.2f}" for n in names) + f" | {probe} | {cap} | {em} |")
  if preflight["not_predicted"]:
    lines += ["", "Not predicted: " + "; ".join(
        f"`{m}` ({why})" for m, why in preflight["not_predicted"].items()) + "."]
  lines += ["", "Verdicts:", ""] + [f"- {v}" for v in preflight["verdicts"]]
  return lines


# --------------------------------------------------------------------------- evaluation


def score_model(study: RecyclePeftStudy, inputs: Inputs, model: Model) -> dict[str, np.ndarray]:
  """Per question: exact [N], loglik [N] (summed over answer tokens), tokens [N]."""
  recycled = model.recycled
  out = eval_lib.teacher_forced(recycled.params, inputs.cfg, inputs.eval_rows,
                                lora=recycled.lora_for(inputs.eval_qa),
                                batch_size=study.batch_size, pad_id=inputs.pad_id)
  return {"exact": out["exact"].astype(bool), "loglik": -out["loss"] * out["tokens"],
          "tokens": out["tokens"]}


def records_for(model: Model, scores: Mapping[str, np.ndarray], groups: Sequence[str],
                preflight: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
  """One record for all questions and one per group; `preflight` (the method's pre-flight
  summary) goes on the record of all questions."""
  groups_arr = np.asarray(groups)
  names = ["all"] + (sorted(set(groups)) if len(set(groups)) > 1 else [])
  out = []
  for g in names:
    sel = np.ones(len(groups), bool) if g == "all" else groups_arr == g
    tokens = float(scores["tokens"][sel].sum())
    rec = {"study": "recycle_peft", "method": model.name, "kind": model.kind, "group": g,
           "n": int(sel.sum()), "exact_match": float(scores["exact"][sel].mean()),
           "answer_loglik": float(scores["loglik"][sel].mean()),
           "nll_per_token": float(-scores["loglik"][sel].sum() / max(tokens, 1.0)),
           "data_free": model.data_free}
    if model.extra:
      rec["extra"] = model.extra
    if preflight is not None and g == "all":
      rec["preflight"] = dict(preflight)
    out.append(rec)
  return out


# ------------------------------------------------------------------------------ outputs


def _atomic_dir(final: pathlib.Path, write) -> None:
  """Call write(tmp_dir), then put tmp_dir at `final` (replacing an older one)."""
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
  try:
    write(tmp)
    if final.exists():
      old = final.with_name(f".{final.name}.old")
      shutil.rmtree(old, ignore_errors=True)
      os.replace(final, old)
      os.replace(tmp, final)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def export_adapter(study: RecyclePeftStudy, inputs: Inputs, adapter: lora_lib.Adapter,
                   workdir: pathlib.Path) -> pathlib.Path:
  """The merged adapter as a PEFT directory `<workdir>/export/<method>/` (written atomically)."""
  final = workdir / "export" / study.export
  host = {p: lora_lib.LoraFactors(np.asarray(jax.device_get(f.a), np.float32),
                                  np.asarray(jax.device_get(f.b), np.float32), f.scale)
          for p, f in adapter.items()}
  _atomic_dir(final, lambda d: ipeft.save_adapter(
      host, d, arch=inputs.arch, num_layers=inputs.cfg.n_layers,
      base_model_name_or_path=str(pathlib.Path(study.base).resolve())))
  return final


def _save_figure(fig, path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def plot(records: Sequence[Mapping[str, Any]], workdir: pathlib.Path) -> list[str]:
  """figures/exact_match.png and figures/answer_loglik.png: one bar per method (all groups)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in records if r["group"] == "all"]
  colors = {"base": "0.5", "single": "tab:blue", "merge": "tab:orange", "router": "tab:green"}
  written = []
  for metric, label in (("exact_match", "exact match"), ("answer_loglik", "answer log-lik")):
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(rows) + 1.5), 3.4))
    ax.bar(range(len(rows)), [r[metric] for r in rows],
           color=[colors[r["kind"]] for r in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["method"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(label)
    if metric == "exact_match":
      ax.set_ylim(0, 1)
    ax.set_title(f"{label} on the evaluation questions (grey base, blue single adapters, "
                 "orange merges, green routers)", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, workdir / "figures" / f"{metric}.png")
    plt.close(fig)
    written.append(f"figures/{metric}.png")
  return written


def report_text(study: RecyclePeftStudy, inputs: Inputs, records: Sequence[Mapping[str, Any]],
                figures: Sequence[str], exported: pathlib.Path | None,
                workdir: pathlib.Path, preflight: Mapping[str, Any] | None = None,
                preflight_skipped: str | None = "config.preflight=False") -> str:
  groups = sorted({r["group"] for r in records} - {"all"})
  lines = ["# Recycling your PEFT adapters", "",
           f"Base `{study.base}` ({inputs.arch}, {transformer.num_params(inputs.params):,} "
           f"parameters, {study.dtype}); {len(inputs.eval_qa)} questions from `{study.eval}`"
           + (f" in groups {groups}" if groups else "") + ".", "",
           "| adapter | directory | modules | rank |", "|---|---|---|---|"]
  for name, path, tg, ad in zip(inputs.names, split_paths(study.adapters), inputs.targets,
                                inputs.adapters):
    ranks = sorted({ad[p].rank for p in tg})
    lines.append(f"| {name} | `{path}` | {len(tg)} | {', '.join(map(str, ranks))} |")
  lines += ["", "Merge weights: " + (f"{list(inputs.weights)}" if inputs.weights else
                                       "each merge's default") + ". Exact match: the greedy "
            "continuation starts with the answer" + (" and EOS" if study.answer_eos else "")
            + " (teacher-forced argmax at every answer token). Answer log-lik: log p(answer | "
            "prompt), summed over its tokens, mean over questions.", ""]
  header = "| method | kind | data-free | exact match | answer log-lik | NLL/token |"
  sep = "|---|---|---|---|---|---|"
  for g in groups:
    header += f" {g} |"
    sep += "---|"
  lines += [header, sep]
  by = {(r["method"], r["group"]): r for r in records}
  for r in (r for r in records if r["group"] == "all"):
    row = (f"| {r['method']} | {r['kind']} | {'yes' if r['data_free'] else 'no'} | "
           f"{r['exact_match']:.3f} | {r['answer_loglik']:.3f} | {r['nll_per_token']:.3f} |")
    for g in groups:
      row += f" {by[(r['method'], g)]['exact_match']:.3f} |"
    lines.append(row)
  if groups:
    lines += ["", "Per-group columns: exact match."]
  if inputs.skipped:
    lines += ["", "Methods that do not apply to these adapters:", ""]
    lines += [f"- `{m}`: {why}" for m, why in inputs.skipped.items()]
  if exported is not None:
    lines += ["", f"Exported `{study.export}` as a PEFT adapter: `{exported.relative_to(workdir)}` "
              "(load with `PeftModel.from_pretrained(base_model, path)`)."]
  lines += preflight_section(preflight, preflight_skipped, records, study.erase_below)
  lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
  lines += ["", "Numbers are for these questions only; with few questions, differences of a "
            "few points are noise. `results.jsonl` holds every record."]
  return "\n".join(lines) + "\n"


def main(config, workdir: pathlib.Path) -> None:
  study = parse(config)
  workdir = pathlib.Path(workdir)
  timings: dict[str, float] = {}
  start = time.time()
  inputs = load_inputs(study)  # no stage line before it: a refusal is one line on stderr
  timings["read inputs"] = round(time.time() - start, 2)
  common.log(f"{len(inputs.adapters)} adapters, {len(inputs.eval_qa)} questions, methods "
             f"{inputs.methods}" + (f"; not applicable: {sorted(inputs.skipped)}"
                                    if inputs.skipped else ""))
  # Pre-flight diagnostics: every input is read and checked, no model has been evaluated.
  preflight, preflight_skipped = None, "config.preflight=False"
  if study.preflight:
    with common.stage("pre-flight", timings):
      try:
        preflight = run_preflight(study, inputs)
      except ValueError as e:  # a model the diagnostics do not cover: evaluate anyway
        preflight_skipped = f"the diagnostics do not apply to this model ({e})"
        common.log(f"pre-flight skipped: {preflight_skipped}")
  summaries = {m: preflight_summary(e, study.erase_below)
               for m, e in (preflight or {}).get("methods", {}).items()}
  if summaries:
    common.log("pre-flight, lowest predicted retention: " + ", ".join(
        f"{m} {s['min_retention']:.2f}" for m, s in summaries.items()) + " (verdicts in "
        "report.md)")
  common.write_json(workdir / "config.json", schema.to_dict(study))
  if preflight is not None:
    common.write_json(workdir / "preflight.json", preflight)
  records = []
  groups = [q.group for q in inputs.eval_qa]
  exported = None
  count = 1 + len(inputs.adapters) + len(inputs.methods)
  with common.stage(f"recycle and evaluate {count} models", timings):
    progress = common.Progress("evaluate", count, every=2.0)
    for i, model in enumerate(build_models(study, inputs)):
      records += records_for(model, score_model(study, inputs, model), groups,
                             summaries.get(model.name))
      if model.name == study.export:
        exported = export_adapter(study, inputs, model.recycled.adapter, workdir)
      progress.update(i + 1, model.name)
  if exported is not None:
    common.log(f"exported {study.export} to {exported}")
  figures = plot(records, workdir)
  common.write_jsonl(workdir / "results.jsonl", records)
  common.atomic_write_text(workdir / "report.md",
                           report_text(study, inputs, records, figures, exported, workdir,
                                       preflight, preflight_skipped))
  timings["total"] = round(time.time() - start, 2)
  common.write_json(workdir / "timings.json", timings)
  best = max((r for r in records if r["group"] == "all"), key=lambda r: r["exact_match"])
  common.log(f"{len(records)} records in {workdir / 'results.jsonl'}; best exact match "
             f"{best['exact_match']:.3f} ({best['method']})")
