"""Study 'preflight' (issue 16): data-free predictions of what a recycled library keeps.

Modes (`config.mode`):
  workdir  — the adapters of a finished recycling-study workdir (`config.source`), read
             through its files only: `config.json`, `tokenizer/`, `cache/base/*/ckpt` and
             `cache/adapters/<name>-<hash>/ckpt` (orbax, via `lora_limits.checkpoint`).
  hf       — a Hugging Face checkpoint directory (`config.hf_path`) and PEFT adapter
             directories (`config.peft_dirs`, 'name=dir' each).
  validate — run small recycling studies over a grid (`config.grid`), predict every setting
             from its adapters, measure it (teacher-forced exact match of the recycled model on
             each adapter's own training facts, and the study's own two-hop records), and
             compare by Spearman's ρ with bootstrap intervals, next to the prior-art
             similarity baselines; scatter plots.
Each writes `preflight.json` and `preflight.md` (validate: also `validation.json`,
`validation.md`, `settings.jsonl` and `figures/`) into the workdir.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from experiments import common
from experiments import schema
from lora_limits import checkpoint as ckpt_lib
from lora_limits import exact_match as eval_lib
from lora_limits import lora as lora_lib
from lora_limits import preflight as pf
from lora_limits import tokenizer as tok_lib
from lora_limits import train as train_lib
from lora_limits.models import transformer
from lora_limits.recycle import merge as merge_lib
from lora_limits.recycle import route as route_lib
from lora_limits.tasks import common as task_common
from lora_limits.tasks import math_word, two_hop

MODES = ("workdir", "hf", "validate")
LIBRARIES = {"two": ("hop1", "hop2"), "two_plus_target": ("hop1", "hop2", "target")}
TARGETS = {"attn": r"attn/(q|k|v|o)_proj/kernel$", "mlp": r"mlp/(gate|up|down)_proj/kernel$",
           "all": lora_lib.DEFAULT_TARGETS}
BASELINES = ("task_vector_cosine", "subspace_overlap", "cka")


# ------------------------------------------------------------------------ reading a study


@dataclasses.dataclass
class Study:
  """A finished recycling study, as far as its files tell."""

  workdir: pathlib.Path
  config: dict
  model_cfg: transformer.ModelConfig
  params: Any
  tokenizer: Any
  adapters: dict[str, lora_lib.Adapter]


def _latest(directory: pathlib.Path) -> tuple[ckpt_lib.Checkpointer, int]:
  ck = ckpt_lib.Checkpointer(directory)
  step = ck.latest_step()
  if step is None:
    ck.close()
    raise ValueError(f"{directory} holds no finished checkpoint")
  return ck, step


def _restore(directory: pathlib.Path, trainable_like) -> Any:
  """The trainable part of a train-state checkpoint (optimizer state restored and dropped;
  its structure is train.make_optimizer's: clip + AdamW)."""
  ck, step = _latest(directory)
  try:
    like = jax.eval_shape(lambda t: train_lib.TrainState(
        jnp.zeros((), jnp.int32), t,
        train_lib.make_optimizer(train_lib.OptimConfig(), 1).init(t)), trainable_like)
    state, _ = ck.restore(step, like)
  finally:
    ck.close()
  return state.trainable


def _one_dir(dirs: list[pathlib.Path], what: str, workdir: pathlib.Path) -> pathlib.Path:
  if len(dirs) != 1:
    raise ValueError(f"{workdir} holds {len(dirs)} {what} checkpoints "
                     f"({[d.parent.name for d in dirs]}); the workdir files do not say which "
                     "seed each belongs to, so preflight reads single-seed workdirs (rerun with "
                     "one seed, or one cache per seed)")
  return dirs[0]


def _fitting_adapter(dirs: list[pathlib.Path], like, name: str, workdir: pathlib.Path):
  """The one checkpoint among `dirs` whose layout fits this study's adapters (a shared cache
  may hold adapters of other ranks or targets: their layout differs and they are skipped)."""
  found = []
  for d in dirs:
    try:
      found.append((d, _restore(d, like)))
    except ckpt_lib.CheckpointError:  # another layout
      continue
    except ValueError:  # no finished checkpoint (a training run that was stopped)
      continue
  if not found:
    return None
  _one_dir([d for d, _ in found], f"{name!r} adapter", workdir)
  return found[0][1]


def read_study(workdir: str | pathlib.Path) -> Study:
  """Base params, tokenizer and adapters of a finished single-seed study workdir."""
  workdir = pathlib.Path(workdir)
  cfg_path = workdir / "config.json"
  if not cfg_path.is_file():
    raise ValueError(f"{workdir} is not a study workdir: it has no config.json")
  config = json.loads(cfg_path.read_text())
  cache = pathlib.Path(config["cache_dir"]) if config.get("cache_dir") else workdir / "cache"
  tokenizer = tok_lib.load(str(workdir / "tokenizer"))
  m = config["model"]
  if m.get("hf_path"):
    from lora_limits.interop import hf
    model_cfg, params, _ = hf.load_checkpoint(m["hf_path"], tokenizer=False)
  else:
    model_cfg = transformer.ModelConfig(
        vocab_size=len(tokenizer), d_model=m["d_model"], n_layers=m["n_layers"],
        n_heads=m["n_heads"], n_kv_heads=m["n_kv_heads"] or None, d_ff=m["d_ff"],
        max_len=m["max_len"], tie_embeddings=m["tie_embeddings"])
    base_dir = _one_dir(sorted((cache / "base").glob("*/ckpt")), "base-model", workdir)
    like = jax.eval_shape(lambda: transformer.init(jax.random.key(0), model_cfg))
    params = _restore(base_dir, like)
  a = config["adapters"]
  spec = lora_lib.LoraConfig(rank=a["rank"], alpha=a["alpha"], targets=a["targets"],
                             rslora=a["rslora"], dropout=a["dropout"])
  like = jax.eval_shape(lambda p: lora_lib.init(jax.random.key(0), p, spec), params)
  by_name: dict[str, list[pathlib.Path]] = {}
  for d in sorted((cache / "adapters").glob("*/ckpt")):
    by_name.setdefault(d.parent.name.rsplit("-", 1)[0], []).append(d)
  if not by_name:
    raise ValueError(f"{cache / 'adapters'} holds no adapter checkpoints")
  adapters = {}
  for name, dirs in sorted(by_name.items()):
    adapter = _fitting_adapter(dirs, like, name, workdir)
    if adapter is not None:
      adapters[name] = adapter
  return Study(workdir, config, model_cfg, params, tokenizer, adapters)


def study_methods(config: Mapping[str, Any], seed: int) -> list[pf.MethodConfig]:
  """The study's data-free methods with its options (`recycle.options.<method>`, as the
  recycling study sets them)."""
  r = config["recycle"]
  options = r.get("options", {})
  out = []
  for m in r["methods"]:
    o = dict(options.get(m, {}))
    if m == "arrow":
      out.append(pf.MethodConfig(m, m, {"top_k": o.get("top_k", 1),
                                        "temperature": o.get("temperature", 1.0)}))
    elif m in merge_lib.METHODS:
      if merge_lib.METHODS[m].random:
        o["key"] = jax.random.key(seed)
      out.append(pf.MethodConfig(m, m, o))
  return out


def libraries_of(config: Mapping[str, Any], names: Sequence[str]) -> dict[str, tuple[str, ...]]:
  d = int(config["recycle"].get("distractors", 0))
  extra = tuple(f"distractor{i}" for i in range(1, d + 1))
  out = {}
  for lib in config["recycle"]["libraries"]:
    members = LIBRARIES.get(lib, ()) + extra
    if members and all(n in names for n in members):
      out[lib] = members
  return out


# ---------------------------------------------------------------------------- reporting


def _fmt(x: Any) -> str:
  if isinstance(x, float):
    return "nan" if not math.isfinite(x) else f"{x:.2f}"
  return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in rows]
  return lines


def library_markdown(title: str, report: Mapping[str, Any]) -> list[str]:
  names = report["adapters"]
  lines = [f"### {title}", "", "Predicted retention (1: the adapter's writes on its own keys "
           "are kept; 0: erased):", ""]
  rows = []
  for method, e in report["methods"].items():
    extra = (f"entropy {e['router']['routing_entropy']:.2f}/{e['router']['max_entropy']:.2f}"
             if "router" in e else f"capacity {e['capacity']['min_ratio']:.2f}")
    rows.append([method] + [e["retention"][n] for n in names] + [extra])
  lines += _table(["method"] + names + ["capacity / routing"], rows)
  lines += ["", "Bridge paths (writer → reader at a later block; strength vs a random "
            "subspace):", ""]
  lines += _table(["writer", "reader", "pairs", "strength", "random", "exists"],
                  [[b["writer"], b["reader"], b["pairs"], b["strength"], b["random_baseline"],
                    b["exists"]] for b in report["bridge"]])
  lines += ["", "Verdicts:", ""] + [f"- {v}" for v in report["verdicts"]] + [""]
  return lines


def _retention_figure(path: pathlib.Path, report: Mapping[str, Any], title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = report["adapters"]
  methods = list(report["methods"])
  grid = np.array([[report["methods"][m]["retention"][n] for n in names] for m in methods])
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 0.9 + 0.35 * len(methods)))
  im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
  ax.set_xticks(range(len(names)), names)
  ax.set_yticks(range(len(methods)), methods)
  for i in range(len(methods)):
    for j in range(len(names)):
      ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
              color="white" if grid[i, j] < 0.6 else "black", fontsize=8)
  fig.colorbar(im, ax=ax, label="predicted retention")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def check_study(study: Study, seed: int,
                methods: Sequence[pf.MethodConfig] | None = None) -> dict[str, Any]:
  methods = study_methods(study.config, seed) if methods is None else methods
  libs = libraries_of(study.config, list(study.adapters))
  out = {}
  for lib, members in libs.items():
    out[lib] = pf.check_library(study.params, {n: study.adapters[n] for n in members}, methods,
                                head_dim=study.model_cfg.resolved_head_dim,
                                activation=study.model_cfg.activation)
  return out


def write_preflight(workdir: pathlib.Path, source: str, reports: Mapping[str, Any]) -> None:
  common.write_json(workdir / "preflight.json", {"source": source, "libraries": reports})
  lines = ["# Pre-flight check", "", f"Source: `{source}`. Predictions from the base weights "
           "and the adapters alone (no data, no labels); see `lora_limits/preflight.py`.", ""]
  for lib, rep in reports.items():
    fig = workdir / "figures" / f"retention_{lib}.png"
    _retention_figure(fig, rep, f"predicted retention, library {lib}")
    lines += library_markdown(f"Library `{lib}`", rep) + [f"![retention]({fig.relative_to(workdir)})", ""]
  common.atomic_write_text(workdir / "preflight.md", "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- validation


def _setting_config(base: config_dict.ConfigDict, spec: str) -> tuple[str, config_dict.ConfigDict]:
  """'task:rank:targets:distractors:seed' → (name, a recycling-study ConfigDict)."""
  parts = spec.split(":")
  if len(parts) != 5:
    raise ValueError(f"grid entry {spec!r} must be 'task:rank:targets:distractors:seed'")
  task, rank, targets, distractors, seed = parts
  if task != "two_hop":
    raise ValueError(f"grid entry {spec!r}: task {task!r} is not supported by validate (only "
                     "'two_hop': the math world's measured retention needs its own study size)")
  if targets not in TARGETS:
    raise ValueError(f"grid entry {spec!r}: targets {targets!r} is not one of {list(TARGETS)}")
  c = config_dict.ConfigDict(base.to_dict())
  c.seeds = (int(seed),)
  c.adapters.rank = int(rank)
  c.adapters.alpha = 2.0 * int(rank)
  c.adapters.targets = TARGETS[targets]
  c.recycle.distractors = int(distractors)
  c.recycle.options.svd.rank = int(rank)
  return spec.replace(":", "_"), c


def _facts(config: Mapping[str, Any], seed: int, name: str) -> list[task_common.Example]:
  """The training facts of adapter `name` (its split over every tier), rebuilt from the
  study's world settings."""
  world = two_hop.build(task_common.settings_from_mapping(
      two_hop.TwoHopConfig, dict(config["world"], seed=seed)))
  return [e for g in world.groups for e in world.splits[g].get(name, ())]


def _exact(params, cfg, tokenizer, rows, lora=None) -> tuple[float, float]:
  """(exact match, mean answer NLL), teacher-forced."""
  out = eval_lib.teacher_forced(params, cfg, rows, lora=lora, batch_size=64,
                                pad_id=tokenizer.pad_token_id)
  return float(np.mean(out["exact"])), float(np.mean(out["loss"]))


def _pooled(records, **where) -> tuple[float, float, int] | None:
  """(accuracy, chance, n) pooled over tiers (n-weighted) for matching records."""
  rs = [r for r in records if all(r.get(k) == v for k, v in where.items())
        and r.get("chance") is not None]
  n = sum(r["n"] for r in rs)
  if not n:
    return None
  return (sum(r["accuracy"] * r["n"] for r in rs) / n, sum(r["chance"] * r["n"] for r in rs) / n,
          n)


def _above_chance(acc: float, chance: float, n: int, z: float = 2.0) -> bool:
  return acc > chance + z * math.sqrt(chance * (1 - chance) / n)


def measure_setting(study: Study, seed: int, reports: Mapping[str, Any],
                    records: list[dict], specs: Sequence[pf.MethodConfig]) -> list[dict[str, Any]]:
  """One row per (library, method, hop adapter): predicted vs measured retention, plus the
  library-level composition predictions and measurements."""
  cfg, tok = study.model_cfg, study.tokenizer
  rows_by = {n: tok_lib.encode_examples(tok, _facts(study.config, seed, n))
             for n in ("hop1", "hop2")}
  single = {n: _exact(study.params, cfg, tok, rows_by[n],
                      lora_lib.LoraMix.single(study.adapters[n])) for n in rows_by}
  base_acc = {n: _exact(study.params, cfg, tok, rows_by[n]) for n in rows_by}
  target = _pooled(records, library="single", method="target", split="test_two_hop_direct")
  composable = target is not None and _above_chance(*target)
  methods = {m.name: m for m in specs}
  out = []
  for lib, rep in reports.items():
    lib_ads = [study.adapters[n] for n in rep["adapters"]]
    for name, entry in rep["methods"].items():
      spec = methods[name]
      if spec.method == "arrow":
        mix = route_lib.arrow_router(lib_ads, top_k=min(spec.options["top_k"], len(lib_ads)),
                                     temperature=spec.options["temperature"])
        params = study.params
      else:
        mix = None
        params = merge_lib.merge(lib_ads, spec.method, **spec.options).apply(study.params)
      direct = _pooled(records, library=lib, method=name, split="test_two_hop_direct")
      cot = _pooled(records, library=lib, method=name, split="test_two_hop_cot")
      bridge = {(b["writer"], b["reader"]): b for b in rep["bridge"]}
      b12 = bridge[("hop1", "hop2")]
      for hop in ("hop1", "hop2"):
        acc, nll = _exact(params, cfg, tok, rows_by[hop], mix)
        gain = base_acc[hop][1] - single[hop][1]
        test = _pooled(records, library=lib, method=name, split=f"test_{hop}")
        test_single = _pooled(records, library="single", method=hop, split=f"test_{hop}")
        base_line = rep["baselines"][hop]
        out.append({
            "setting": study.workdir.name, "library": lib, "method": name, "adapter": hop,
            "predicted": entry["retention"][hop],
            "predicted_probe": entry.get("probe_retention", {}).get(hop),
            # graded: the fraction of the adapter's answer-NLL improvement over the base kept
            "measured": (base_acc[hop][1] - nll) / gain if gain > 0 else None,
            "measured_exact": acc / max(single[hop][0], 1e-9),
            "merged_exact": acc, "single_exact": single[hop][0], "base_exact": base_acc[hop][0],
            "merged_nll": nll, "single_nll": single[hop][1], "base_nll": base_acc[hop][1],
            "measured_test": (test[0] / test_single[0] if test and test_single and test_single[0]
                              else None),
            **{f"baseline_{k}": base_line[k] for k in BASELINES},
            "bridge_exists": b12["exists"], "bridge_pairs": b12["pairs"],
            "bridge_strength": b12["strength"],
            "predicted_cot": entry["retention"]["hop1"] * entry["retention"]["hop2"],
            "direct_accuracy": direct[0] if direct else None,
            "direct_above_chance": _above_chance(*direct) if direct else None,
            "cot_accuracy": cot[0] if cot else None, "base_can_compose": composable})
  return out


def _scatter(path: pathlib.Path, x, y, xlabel: str, ylabel: str, title: str, groups=None):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(4.2, 3.6))
  x, y = np.asarray(x, float), np.asarray(y, float)
  if groups is None:
    ax.scatter(x, y, s=12, alpha=0.7)
  else:
    for g in sorted(set(groups)):
      sel = np.array([gg == g for gg in groups])
      ax.scatter(x[sel], y[sel], s=12, alpha=0.7, label=g)
    ax.legend(fontsize=6, ncol=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summarise(rows: Sequence[Mapping[str, Any]], seed: int, n_boot: int) -> dict[str, Any]:
  """ρ with bootstrap intervals: the pre-flight prediction and each baseline (negated:
  higher similarity predicts lower retention) against measured retention; the composition
  agreement where the base model can compose; CoT prediction vs measured CoT accuracy."""
  rows = [r for r in rows if r["measured"] is not None]
  measured = [r["measured"] for r in rows]
  out: dict[str, Any] = {"n_points": len(rows),
                         "n_settings": len({(r["setting"], r["library"], r["method"])
                                            for r in rows})}

  def rhos(target: str) -> dict[str, tuple[float, float, float]]:
    y = [r[target] for r in rows]
    res = {"preflight": pf.bootstrap_spearman([r["predicted"] for r in rows], y, seed=seed,
                                              n_boot=n_boot)}
    if all(r.get("predicted_probe") is not None for r in rows):
      res["preflight_probe"] = pf.bootstrap_spearman([r["predicted_probe"] for r in rows], y,
                                                     seed=seed, n_boot=n_boot)
    for k in BASELINES:
      res[k] = pf.bootstrap_spearman([-r[f"baseline_{k}"] for r in rows], y, seed=seed,
                                     n_boot=n_boot)
    return res

  rho = rhos("measured")
  out["retention_spearman"] = {k: {"rho": v[0], "low": v[1], "high": v[2]}
                               for k, v in rho.items()}
  out["retention_spearman_exact"] = {k: {"rho": v[0], "low": v[1], "high": v[2]}
                                     for k, v in rhos("measured_exact").items()}
  best = max((v[0] for k, v in rho.items() if k in BASELINES and math.isfinite(v[0])),
             default=float("nan"))
  out["best_baseline_rho"] = best
  out["goal_rho_0_8"] = bool(rho["preflight"][0] >= 0.8)
  out["goal_beats_baseline_by_0_1"] = bool(math.isfinite(best)
                                           and rho["preflight"][0] >= best + 0.1)
  test_rows = [r for r in rows if r["measured_test"] is not None]
  if len(test_rows) >= 3:
    v = pf.bootstrap_spearman([r["predicted"] for r in test_rows],
                              [r["measured_test"] for r in test_rows], seed=seed, n_boot=n_boot)
    out["retention_spearman_test_splits"] = {"rho": v[0], "low": v[1], "high": v[2],
                                             "n": len(test_rows)}
  libs = {}
  for r in rows:
    libs.setdefault((r["setting"], r["library"], r["method"]), r)
  comp = [r for r in libs.values() if r["library"] == "two" and r["direct_above_chance"]
          is not None]
  can = [r for r in comp if r["base_can_compose"]]
  out["composition"] = {
      "library_settings": len(comp), "where_base_can_compose": len(can),
      "agreement": (float(np.mean([r["bridge_exists"] == r["direct_above_chance"] for r in can]))
                    if can else None),
      "measured_direct_above_chance": sum(bool(r["direct_above_chance"]) for r in comp),
      "predicted_bridge": sum(bool(r["bridge_exists"]) for r in comp)}
  cot = [r for r in libs.values() if r["cot_accuracy"] is not None]
  if len(cot) >= 3:
    v = pf.bootstrap_spearman([r["predicted_cot"] for r in cot], [r["cot_accuracy"] for r in cot],
                              seed=seed, n_boot=n_boot)
    out["cot_spearman"] = {"rho": v[0], "low": v[1], "high": v[2], "n": len(cot)}
  return out


def validation_markdown(summary: Mapping[str, Any], rows, grid, seconds: float) -> str:
  s = summary
  lines = ["# Pre-flight validation", "",
           f"{s['n_settings']} settings (study × library × method) from {len(grid)} recycling "
           f"studies ({', '.join(grid)}: task:rank:targets:distractors:seed), "
           f"{s['n_points']} (setting, adapter) points; {seconds / 60:.1f} min.", "",
           "Measured retention, on each adapter's own training facts (teacher-forced): "
           "**graded** = the fraction of the adapter's answer-NLL improvement over the base "
           "model that the recycled model keeps, (NLL_base − NLL_recycled)/(NLL_base − "
           "NLL_adapter); **exact** = exact match of the recycled model ÷ the adapter's. "
           "Predictors: `preflight` = key retention (the adapters' own keys; the issue's "
           "definition), `preflight_probe` = the same score on data-free probe inputs from the "
           "base embeddings (counts input overlap). Baselines are method-agnostic similarities "
           "(max over the other adapters of the library), negated.", "",
           "## Retention: Spearman ρ (95% bootstrap interval)", ""]
  ex = s["retention_spearman_exact"]
  lines += _table(["predictor", "ρ graded", "low", "high", "ρ exact", "low", "high"],
                  [[k, v["rho"], v["low"], v["high"], ex[k]["rho"], ex[k]["low"], ex[k]["high"]]
                   for k, v in s["retention_spearman"].items()])
  lines += ["", f"- Goal ρ ≥ 0.8: **{'met' if s['goal_rho_0_8'] else 'missed'}** "
            f"(ρ = {_fmt(s['retention_spearman']['preflight']['rho'])}).",
            f"- Goal ≥ 0.1 above the best baseline ({_fmt(s['best_baseline_rho'])}): "
            f"**{'met' if s['goal_beats_baseline_by_0_1'] else 'missed'}**."]
  if "retention_spearman_test_splits" in s:
    t = s["retention_spearman_test_splits"]
    lines.append(f"- On the study's held-out one-hop test splits (noisy, n={t['n']} points "
                 f"with a non-zero single-adapter accuracy): ρ = {_fmt(t['rho'])} "
                 f"[{_fmt(t['low'])}, {_fmt(t['high'])}].")
  c = s["composition"]
  lines += ["", "## Composition", "",
            f"- Library `two` settings: {c['library_settings']}; the base model can compose "
            f"(target adapter above chance on direct two-hop) in {c['where_base_can_compose']}.",
            f"- Bridge path predicted in {c['predicted_bridge']}; direct two-hop measured above "
            f"chance in {c['measured_direct_above_chance']}.",
            ("- Agreement where the base can compose: "
             f"{_fmt(c['agreement'])} (goal ≥ 0.90)." if c["agreement"] is not None else
             "- Agreement: **unmeasurable** — in no setting can the base model compose at all "
             "(the goal is neither met nor missed here).")]
  if "cot_spearman" in s:
    t = s["cot_spearman"]
    lines.append(f"- CoT: predicted retention(hop1)·retention(hop2) vs measured CoT accuracy: "
                 f"ρ = {_fmt(t['rho'])} [{_fmt(t['low'])}, {_fmt(t['high'])}] (n={t['n']}).")
  lines += ["", "## Figures", "", "![preflight](figures/retention_preflight.png)",
            "![preflight probe](figures/retention_preflight_probe.png)",
            "![baselines](figures/retention_baselines.png)", "", "## Per method (mean over "
            "points)", ""]
  by = {}
  for r in rows:
    by.setdefault(r["method"], []).append(r)
  lines += _table(["method", "points", "predicted", "predicted (probe)", "measured graded",
                   "measured exact"],
                  [[m, len(v), float(np.mean([r["predicted"] for r in v])),
                    float(np.mean([r["predicted_probe"] or 0.0 for r in v])),
                    float(np.mean([r["measured"] for r in v])),
                    float(np.mean([r["measured_exact"] for r in v]))]
                   for m, v in sorted(by.items())])
  return "\n".join(lines) + "\n"


def validate(config, workdir: pathlib.Path) -> None:
  start = time.time()
  # the merges compile once per (method, shapes); keep the compilations across reruns
  jax.config.update("jax_compilation_cache_dir", str((workdir / "jax_cache").absolute()))
  cfg_module = importlib.import_module("configs.preflight")
  base = cfg_module.validation_study_config(config)
  all_rows = []
  preflight_reports = {}
  for spec in config.grid:
    name, study_cfg = _setting_config(base, spec)
    sub = workdir / "settings" / name
    done = sub / "preflight_rows.json"
    if done.is_file():
      rows = json.loads(done.read_text())
    else:
      common.log(f"validate: study {name}")
      seed = int(study_cfg.seeds[0])
      # one cache per seed: a seed's base model (and adapters shared between settings) are
      # trained once; read_study tells the settings' adapters apart by their layout
      study_cfg.cache_dir = str((workdir / f"cache_seed{seed}").absolute())
      importlib.import_module(f"experiments.studies.{study_cfg.study}").main(study_cfg, sub)
      study = read_study(sub)
      every = json.loads(json.dumps(study.config))
      every["recycle"]["methods"] = list(cfg_module.MERGES) + ["arrow"]
      specs = study_methods(every, seed)
      reports = check_study(study, seed, specs)
      write_preflight(sub, str(sub), reports)
      records = common.read_jsonl(sub / "results.jsonl")
      rows = measure_setting(study, seed, reports, records, specs)
      common.write_json(done, rows)
    preflight_reports[name] = json.loads((sub / "preflight.json").read_text())
    all_rows += rows
    common.log(f"validate: {name}: {len(rows)} points ({common.format_seconds(time.time() - start)})")
  common.write_jsonl(workdir / "settings.jsonl", all_rows)
  summary = summarise(all_rows, seed=int(config.bootstrap_seed), n_boot=int(config.n_boot))
  common.write_json(workdir / "validation.json", summary)
  all_rows = [r for r in all_rows if r["measured"] is not None]
  measured = [r["measured"] for r in all_rows]
  _scatter(workdir / "figures" / "retention_preflight.png", [r["predicted"] for r in all_rows],
           measured, "predicted retention (pre-flight, keys)", "measured retention (graded)",
           f"ρ = {_fmt(summary['retention_spearman']['preflight']['rho'])}",
           [r["method"] for r in all_rows])
  if "preflight_probe" in summary["retention_spearman"]:
    _scatter(workdir / "figures" / "retention_preflight_probe.png",
             [r["predicted_probe"] for r in all_rows], measured,
             "predicted retention (pre-flight, probes)", "measured retention (graded)",
             f"ρ = {_fmt(summary['retention_spearman']['preflight_probe']['rho'])}",
             [r["method"] for r in all_rows])
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(BASELINES), figsize=(4 * len(BASELINES), 3.4))
  for ax, k in zip(axes, BASELINES):
    ax.scatter([r[f"baseline_{k}"] for r in all_rows], measured, s=10, alpha=0.6)
    ax.set_xlabel(k)
    ax.set_ylabel("measured retention")
    ax.set_title(f"ρ(−{k}) = {_fmt(summary['retention_spearman'][k]['rho'])}", fontsize=8)
  fig.tight_layout()
  fig.savefig(workdir / "figures" / "retention_baselines.png", dpi=110)
  plt.close(fig)
  text = validation_markdown(summary, all_rows, list(config.grid), time.time() - start)
  common.atomic_write_text(workdir / "validation.md", text)
  common.write_json(workdir / "preflight.json", {"source": "validate",
                                                 "settings": preflight_reports})
  common.atomic_write_text(workdir / "preflight.md", text)
  common.log(f"validate: {summary['n_settings']} settings, ρ = "
             f"{_fmt(summary['retention_spearman']['preflight']['rho'])}")


# ---------------------------------------------------------------------------------- main


@dataclasses.dataclass(frozen=True)
class PreflightStudy:
  """The typed config (see `configs/preflight.py`); validated before anything is written."""

  study: str
  mode: str
  source: str
  hf_path: str
  peft_dirs: tuple[str, ...]
  methods: tuple[str, ...]
  grid: tuple[str, ...]
  pretrain_steps: int
  adapter_steps: int
  n_boot: int
  bootstrap_seed: int

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r} is not one of {list(MODES)}")
    allowed = sorted(merge_lib.METHODS) + ["arrow"]
    if not self.methods:
      raise ValueError(f"methods must name at least one of {allowed}")
    for m in self.methods:
      if m not in allowed:
        raise ValueError(f"methods has {m!r}; allowed: {allowed}")
    if not self.grid:
      raise ValueError("grid must list at least one 'task:rank:targets:distractors:seed'")
    for spec in self.grid:
      parts = spec.split(":")
      if (len(parts) != 5 or parts[0] != "two_hop" or parts[2] not in TARGETS
          or not all(p.isdigit() for p in (parts[1], parts[3], parts[4]))
          or int(parts[1]) < 1):
        raise ValueError(f"grid has {spec!r}; entries are 'two_hop:RANK:TARGETS:DISTRACTORS:"
                         f"SEED' with RANK >= 1 and TARGETS one of {list(TARGETS)}")
    for name in ("pretrain_steps", "adapter_steps", "n_boot"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.bootstrap_seed < 0:
      raise ValueError(f"bootstrap_seed must be >= 0, got {self.bootstrap_seed}")


def parse(config: Any) -> PreflightStudy:
  """The ConfigDict → a validated PreflightStudy (ConfigError names the field)."""
  return schema.build(PreflightStudy, config, "config")


def main(config, workdir: pathlib.Path) -> None:
  mode = parse(config).mode
  if mode == "validate":
    validate(config, workdir)
    return
  if mode == "workdir":
    if not config.source:
      raise ValueError("config.source must name a finished study workdir")
    study = read_study(config.source)
    seeds = study.config["seeds"]
    write_preflight(workdir, str(config.source), check_study(study, int(seeds[0])))
    return
  from lora_limits.interop import hf, peft
  if not config.hf_path or not config.peft_dirs:
    raise ValueError("mode 'hf' needs config.hf_path and config.peft_dirs ('name=dir', ...)")
  model_cfg, params, _ = hf.load_checkpoint(config.hf_path, tokenizer=False)
  adapters = {}
  for item in config.peft_dirs:
    name, sep, path = item.partition("=")
    if not sep:
      name, path = pathlib.Path(item).name, item
    adapters[name] = peft.load_adapter(path, params)
  methods = [pf.MethodConfig(m, m, {"top_k": 1} if m == "arrow" else {})
             for m in config.methods]
  report = pf.check_library(params, adapters, methods, head_dim=model_cfg.resolved_head_dim)
  write_preflight(workdir, str(config.hf_path), {"library": report})
