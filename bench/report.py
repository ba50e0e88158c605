"""BENCHMARKS.md and the figures, generated from results.json (never edited by hand).

`targets(results)` checks the issue's targets against the measured ratios; `render` writes
every table with the command, machine, library versions, date and load that produced it;
the analysis paragraphs are computed from the same numbers, so a rerun rewrites them.
"""

from __future__ import annotations

import os
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

MiB = 2 ** 20
GiB = 2 ** 30


# --- formatting ----------------------------------------------------------------------------

def _f(x: float | None, digits: int = 3) -> str:
  if x is None:
    return "—"
  if x == 0:
    return "0"
  if abs(x) >= 10 ** digits:
    return f"{x:,.0f}"
  return f"{x:.{digits}g}"


def _x(x: float | None) -> str:
  return "—" if x is None else f"{_f(x)}×"


def _pct(x: float | None) -> str:
  if x is None:
    return "—"
  return f"{100 * x:.0f}%" if abs(x) >= 0.1 else f"{100 * x:.2g}%"


def _mib(x: float | None) -> str:
  return "—" if x is None else f"{x / MiB:,.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _range(values: Sequence[float], fmt=_x) -> str:
  if not values:
    return "—"
  if len(values) == 1:
    return fmt(values[0])
  return f"{fmt(min(values))} – {fmt(max(values))} (median {fmt(statistics.median(values))})"


def _met(ok: bool | None) -> str:
  return "—" if ok is None else ("met" if ok else "**missed**")


# --- targets -----------------------------------------------------------------------------------

def _peft_rate(loop: dict[str, Any]) -> float:
  """The faster of PEFT on torch's default threads and on one thread (the stronger one)."""
  return max(loop[n]["combos_per_s"] for n in ("peft", "peft_1thread") if n in loop)


def _regimes(cells: list[dict]) -> tuple[int | None, int | None]:
  """(few-shot examples, compute-bound examples): the smallest and largest examples value."""
  values = sorted({c["examples"] for c in cells})
  if not values:
    return None, None
  return values[0], (values[-1] if len(values) > 1 else None)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """The issue's targets: what was measured for ours (`score_combinations` as shipped) and,
  for scoring, for the bench's merged-route prototype (dense_map); whether each is met (None:
  not measured in this run)."""
  parts = results.get("parts", {})
  out = []

  def add(name, shipped, shipped_ok, proto=None, proto_ok=None, source=""):
    out.append({"target": name, "ours": shipped, "met": shipped_ok, "dense_map": proto,
                "met_dense_map": proto_ok, "source": source})

  cells = parts.get("scoring", {}).get("cells", [])
  few, heavy = _regimes(cells)

  loops = parts.get("scoring", {}).get("loops", [])

  def ratio_target(name, examples, key, threshold):
    """Over every cell (K × C); against PEFT from the side-by-side groups (K), and dense_map
    from the cells (its rate over PEFT's rate of the same K)."""
    other = key[1]
    sel = [c for c in cells if c["examples"] == examples and other in c]
    if examples is None or not sel:
      add(name, None, None, source="scoring")
      return
    proto = [c["ratios"][f"dense_map/{other}"] for c in sel]
    if other == "peft":
      group = [lp for lp in loops if lp["examples"] == examples and "peft" in lp]
      mine = [lp["ours"]["combos_per_s"] / _peft_rate(lp) for lp in group]
      where = f"scoring, {examples} examples, side by side at {len(group)} K"
    else:
      mine = [c["ratios"][f"ours/{other}"] for c in sel]
      where = f"scoring, {examples} examples, {len(sel)} cells (K × C)"
    add(name, _range(mine), min(mine) >= threshold, _range(proto), min(proto) >= threshold,
        where)

  ratio_target("few-shot scoring ≥ 20× the PEFT loop", few, ("ours", "peft"), 20.0)
  ratio_target("few-shot scoring ≥ 5× the jitted Python loop", few, ("ours", "jax_loop"), 5.0)
  ratio_target("compute-bound scoring ≥ 2× the PEFT loop", heavy, ("ours", "peft"), 2.0)
  ratio_target("compute-bound scoring never slower than the jitted loop", heavy,
               ("ours", "jax_loop"), 1.0)
  util = parts.get("utilisation", {})
  points = [p for p in util.get("scoring", []) if heavy is not None and p["examples"] == heavy]
  if points:
    p = points[0]
    def util_text(e):
      return (f"{_pct(e['fraction_of_concurrent_matmul'])} of the matmul timed alongside "
              f"({_f(e['gflops_per_s'])} of {_f(p['concurrent_matmul_gflops_per_s'])} GFLOP/s); "
              f"{_pct(e['fraction_of_peak'])} of the part's best matmul")

    add("compute-bound scoring ≥ 60% of the matmul peak", util_text(p["ours"]),
        p["ours"]["fraction_of_concurrent_matmul"] >= 0.6, util_text(p["dense_map"]),
        p["dense_map"]["fraction_of_concurrent_matmul"] >= 0.6,
        f"utilisation, {p['examples']} examples, C = {p['num_combinations']}, analytic FLOPs")
  else:
    add("compute-bound scoring ≥ 60% of the matmul peak", None, None, source="utilisation")
  models = parts.get("training", {}).get("models", {})
  r = {n: m["ratios"] for n, m in models.items()}
  vs_torch = {n: v["ours_lora/torch_lora_tokens_per_s"] for n, v in r.items()
              if "ours_lora/torch_lora_tokens_per_s" in v}
  add("LoRA training ≥ 1.3× torch + PEFT tokens/s",
      ", ".join(f"{n}: {_x(v)}" for n, v in vs_torch.items()) or None,
      all(v >= 1.3 for v in vs_torch.values()) if vs_torch else None, source="training")
  lora_full = {n: v["ours_lora_step/ours_full_step"] for n, v in r.items()}
  add("LoRA step ≤ 0.75× a full fine-tuning step",
      ", ".join(f"{n}: {_x(v)}" for n, v in lora_full.items()) or None,
      all(v <= 0.75 for v in lora_full.values()) if lora_full else None, source="training")
  checks = parts.get("scoring", {}).get("memory_check", [])
  planned = [c for c in checks if "xla_total_bytes" in c]
  if planned:
    worst = max(c["xla_total_bytes"] / c["budget_bytes"] for c in planned)
    refused = len(checks) - len(planned)
    add("memory: the evaluator never exceeds its budget, whatever C",
        f"XLA buffers ≤ {_pct(worst)} of the budget over C up to "
        f"{max(c['num_combinations'] for c in checks):,} and "
        f"{len({c['budget_bytes'] for c in checks})} budgets"
        + (f"; {refused} plans refused (budget below one combination)" if refused else ""),
        all(c["within_budget"] for c in checks), source="scoring memory check")
  else:
    add("memory: the evaluator never exceeds its budget, whatever C", None, None,
        source="scoring memory check")
  pk = parts.get("packing", {})
  if "ratio" in pk:
    add("packed pretraining ≥ 2.5× padded real tokens/s", _x(pk["ratio"]), pk["ratio"] >= 2.5,
        source=f"packing, the default world, {pk['model']['d_model']}-wide model")
  else:
    add("packed pretraining ≥ 2.5× padded real tokens/s", None, None, source="packing")
  e2e = parts.get("e2e", {})
  if e2e.get("found"):
    total = e2e["stages"].get("total")
    add("`make run` ≤ 10 minutes", f"{_f(total / 60)} min" if total is not None else None,
        (total <= 600) if total is not None else None, source="e2e timings.json")
  else:
    add("`make run` ≤ 10 minutes", None, None, source="e2e")
  return out


# --- figures -----------------------------------------------------------------------------------

def figures(results: dict[str, Any], directory: pathlib.Path) -> list[pathlib.Path]:
  """scoring.png, training.png, scaling.png (those whose part was measured)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from bench import scaling

  parts = results.get("parts", {})
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  cells = parts.get("scoring", {}).get("cells", [])
  if cells:
    examples = sorted({c["examples"] for c in cells})
    fig, axes = plt.subplots(1, len(examples), figsize=(6.5 * len(examples), 4.2), squeeze=False)
    names = ("ours", "dense_map", "jax_loop", "peft")
    for ax, n in zip(axes[0], examples):
      sel = [c for c in cells if c["examples"] == n]
      labels = [f"K={c['num_adapters']}\nC={c['num_combinations']}" for c in sel]
      width = 0.8 / len(names)
      for i, name in enumerate(names):
        ys = [c[name]["combos_per_s"] if name in c else 0 for c in sel]
        ax.bar([j + i * width for j in range(len(sel))], ys, width, label=name)
      ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sel))], labels, fontsize=7)
      ax.set_yscale("log")
      ax.set_ylabel("combinations per second")
      ax.set_title(f"{n} examples per combination")
      ax.legend(fontsize=7, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    written.append(directory / "scoring.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
  models = parts.get("training", {}).get("models", {})
  if models:
    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = ("ours_lora", "torch_lora", "torch_lora_1thread", "ours_full", "torch_full")
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
      ys = [m[kind]["tokens_per_s"] if kind in m else 0 for m in models.values()]
      ax.bar([j + i * width for j in range(len(models))], ys, width, label=kind)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], list(models))
    ax.set_ylabel("training tokens per second")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(directory / "training.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
  if parts.get("scaling", {}).get("sweeps"):
    written.append(directory / "scaling.png")
    scaling.plot(parts["scaling"], written[-1])
  return written


# --- markdown ----------------------------------------------------------------------------------

def _measured(part: dict[str, Any]) -> str:
  m = part.get("measured", {})
  if not m:
    return ""
  wait = m.get("waited_for_quiet") or {}
  waited = (f" after waiting {_f(wait['waited_s'])} s for other processes to drop below the "
            f"threshold ({'timed out at' if wait['timed_out'] else 'reached'} "
            f"{_f(wait['other_cores'], 2)} cores)" if wait else "")
  return (f"*Measured {m.get('date_utc')} by `{m.get('command')}` (commit {m.get('git_commit')}), "
          f"{_f(m.get('seconds'))} s{waited}; other processes kept "
          f"**{_f(m.get('other_cores_during'), 2)} of the cores busy** on average meanwhile; "
          f"load average (1/5/15 min) {m.get('load_before')} before, {m.get('load_after')} "
          "after.*")


def _machine(results: dict[str, Any]) -> str:
  m = results.get("machine", {})
  if not m:
    return "(no machine recorded)"
  v = m.get("versions", {})
  versions = ", ".join(f"{k} {v[k]}" for k in v if v[k])
  mem = m.get("memory_bytes")
  return "\n".join([
      f"- CPU: {m.get('cpu_model')} ({', '.join(m.get('cpu_flags', []))}), "
      f"{m.get('cores')} cores ({m.get('cores_usable')} usable), "
      f"{_f(mem / GiB if mem else None)} GiB memory",
      f"- Python {m.get('python')}; {versions}; torch threads {m.get('torch_threads')}; "
      f"JAX devices {m.get('jax_devices')}",
      f"- Date {m.get('date_utc')}, commit {m.get('git_commit')}, load average at start "
      f"{m.get('load_average_1_5_15')}",
  ])


def _scoring_section(part: dict[str, Any], rel) -> list[str]:
  out = ["## 1. Scoring combinations", "", _measured(part), ""]
  sizes = part.get("sizes", {})
  model = sizes.get("model", {})
  out += [
      f"Model: {model.get('n_layers')} layers, d {model.get('d_model')}, MLP "
      f"{model.get('d_ff')}, vocab {model.get('vocab_size')} (Llama-style); rank-"
      f"{sizes.get('rank')} adapters on all seven projections; {sizes.get('seq_len')} tokens "
      "per sequence; metric: teacher-forced mean NLL of the answer half. Weights are random, "
      "written with `export_checkpoint` / `save_adapter` and read back by both frameworks. "
      "Contenders: **ours** = `score_combinations(method='mix')` as shipped (one compiled "
      "call, its default plan: the unmerged mixing route, the chunk from the memory budget "
      "and working-set target); **dense_map** = a bench-side prototype, not in the library "
      "(one compiled `lax.map` of merge-then-forward with ours' chunk); "
      "**jax_loop** = a Python loop dispatching one jitted merge-then-forward call per "
      "combination (asynchronously, one block at the end); **peft** = `add_weighted_adapter"
      "(..., 'cat')` + `set_adapter` + no-grad forward + `delete_adapter` per combination, "
      "timed on torch's default threads and on one thread, the faster of the two being the "
      "PEFT rate used in ratios. "
      "Contenders are timed side by side, in rounds that call each in turn after one warm-up "
      "call each: per (examples, K), ours, jax_loop and peft on the same combinations (the "
      "agreement table below); per cell, ours and dense_map on all C combinations with "
      "jax_loop again on its combinations (a loop's cost per combination does not depend on "
      "C). peft, the slowest, is timed only in the first group; its rate is reused for every "
      f"C. Times: median over up to {sizes.get('repeats')} rounds (fewer when the warm-up "
      f"calls together exceeded {sizes.get('budget_s')} s / rounds).", ""]
  cells = part.get("cells", [])
  for n in sorted({c["examples"] for c in cells}):
    sel = [c for c in cells if c["examples"] == n]
    out += [f"**{n} examples per combination** (combinations per second; ratios of rates; "
            "XLA memory = arguments + temps of the compiled plan, MiB):", ""]
    rows = []
    for c in sel:
      r = c["ratios"]
      rows.append([
          c["num_adapters"], c["num_combinations"], c["ours"]["chunk"],
          _f(c["ours"]["combos_per_s"]), _f(c["dense_map"]["combos_per_s"]),
          _f(c.get("jax_loop", {}).get("combos_per_s")), _f(c.get("peft", {}).get("combos_per_s")),
          _x(r.get("ours/jax_loop")), _x(r.get("ours/peft")), _x(r.get("dense_map/jax_loop")),
          _x(r.get("dense_map/peft")),
          _mib(c["ours"]["xla_temp_bytes"] + c["ours"]["xla_argument_bytes"]),
          _mib(c["ours"]["rss_growth_bytes"]), _mib(c["dense_map"]["rss_growth_bytes"]),
          _f(c["ours"]["seconds"].get("other_cores"), 2)])
    out += [_table(["K", "C", "chunk", "ours", "dense_map", "jax_loop", "peft", "ours/loop",
                    "ours/peft", "dense_map/loop", "dense_map/peft", "ours XLA MiB",
                    "ours RSS growth MiB", "dense_map RSS growth MiB", "other procs (cores)"],
                   rows), ""]
  loops = part.get("loops", [])
  if loops:
    out += [f"The three contenders side by side on the same combinations: rates, agreement "
            f"(max |Δ loss| against ours; tolerance {part.get('agreement_atol')}) and memory:",
            ""]
    rows = [[lp["examples"], lp["num_adapters"], lp["combos"], _f(lp["ours"]["combos_per_s"]),
             _f(lp["jax_loop"]["combos_per_s"]), _f(lp.get("peft", {}).get("combos_per_s")),
             _f(lp.get("peft_1thread", {}).get("combos_per_s")),
             _x(lp["ours"]["combos_per_s"] / lp["jax_loop"]["combos_per_s"]),
             _x(lp["ours"]["combos_per_s"] / _peft_rate(lp)) if "peft" in lp else "—",
             _f(lp["agreement"]["max_abs_diff_by_contender"].get("jax_loop"), 2),
             _f(lp["agreement"]["max_abs_diff_by_contender"].get("peft"), 2),
             _f(lp["agreement"]["score_spread"], 2),
             "yes" if lp["agreement"]["agree"] else "**no**",
             _mib(lp["ours"]["rss_growth_bytes"]), _mib(lp["jax_loop"]["rss_growth_bytes"]),
             _mib(lp.get("peft", {}).get("rss_growth_bytes")),
             _f(lp["ours"]["seconds"].get("other_cores"), 2)] for lp in loops]
    out += [_table(["examples", "K", "combos", "ours /s", "jax_loop /s", "peft /s",
                    "peft 1 thread /s", "ours/loop",
                    "ours/best peft", "max Δ jax_loop", "max Δ peft", "spread of scores", "agree",
                    "ours RSS growth MiB", "jax_loop RSS MiB", "peft RSS MiB",
                    "other procs (cores)"], rows), ""]
    worst_cell = max((c["agreement"]["max_abs_diff"] for c in cells), default=None)
    if worst_cell is not None:
      out += [f"Within every cell, dense_map reproduces ours to max |Δ loss| "
              f"{_f(worst_cell, 2)}.", ""]
  checks = part.get("memory_check", [])
  if checks:
    out += ["**Memory budget** (compile only: `memory_analysis` of the default plan; K = 4):", ""]
    rows = [[c["examples"], f"{c['budget_bytes'] / MiB:,.0f}", f"{c['num_combinations']:,}",
             c.get("chunk", "—"), _mib(c.get("xla_total_bytes")),
             _pct(c["xla_total_bytes"] / c["budget_bytes"]) if "xla_total_bytes" in c else "—",
             ("refused: cannot hold one combination" if "refused" in c else
              "yes" if c["within_budget"] else "**no**")] for c in checks]
    out += [_table(["examples", "budget MiB", "C", "chunk", "XLA total MiB", "of budget",
                    "within"], rows), ""]
  if cells:
    out += [f"![scoring]({rel('scoring.png')})", ""]
  return out


def _training_section(part: dict[str, Any], rel) -> list[str]:
  out = ["## 2. LoRA training", "", _measured(part), ""]
  sizes = part.get("sizes", {})
  out += [f"Batch {sizes.get('batch_size')} × {sizes.get('seq_len')} tokens, rank "
          f"{sizes.get('rank')} (alpha {sizes.get('alpha')}) on all seven projections, AdamW "
          "(constant lr, β (0.9, 0.98), no decay) with global-norm clip 1.0, loss on every "
          "position. Ours: `train.make_train_step` compiled once, state donated; torch: "
          "transformers + PEFT (`is_trainable=True`), fused AdamW. Step time: median over "
          f"{sizes.get('repeats')} repeats of {sizes.get('steps')} steps after a warm-up "
          "repeat.", ""]
  rows = []
  for name, m in part.get("models", {}).items():
    r = m["ratios"]
    diff = m.get("loss_max_abs_diff", {})
    rows.append([
        name, f"{m['num_params']:,}", f"{m['lora_params']:,}",
        _ms(m, "ours_lora"), _ms(m, "torch_lora"), _ms(m, "ours_full"), _ms(m, "torch_full"),
        _f(m["ours_lora"]["tokens_per_s"]), _f(m.get("torch_lora", {}).get("tokens_per_s")),
        _x(r.get("ours_lora/torch_lora_tokens_per_s")),
        _x(r.get("ours_lora_step/ours_full_step")), _x(r.get("torch_lora_step/torch_full_step")),
        _x(r.get("ideal_lora/full_flops")),
        _x(_div(m["ours_lora"].get("flops_xla"), m["ours_full"].get("flops_xla"))),
        f"{_f(diff.get('lora'), 2)} / {_f(diff.get('full'), 2)}" if diff else "—",
        _f(m["ours_lora"]["seconds_per_repeat"].get("other_cores"), 2)])
  out += [_table(["model", "params", "LoRA params", "ours LoRA ms", "torch LoRA ms",
                  "ours full ms", "torch full ms", "ours LoRA tok/s", "torch LoRA tok/s",
                  "ours/best torch (LoRA)", "LoRA/full ours", "LoRA/full torch",
                  "LoRA/full matmul FLOPs", "LoRA/full XLA FLOPs",
                  f"max Δ loss, first {sizes.get('check_steps')} steps (LoRA / full)",
                  "other procs (cores)"], rows),
          ""]
  single = [(n, m) for n, m in part.get("models", {}).items() if "torch_lora_1thread" in m]
  if single:
    out += ["torch runs on `torch.get_num_threads()` OpenMP threads, which stall when other "
            "processes take one of the two cores; the same PEFT LoRA step on one thread, timed "
            "in the same rounds: " + "; ".join(
                f"{n}: {_ms(m, 'torch_lora_1thread')} ms on 1 thread vs "
                f"{_ms(m, 'torch_lora')} ms on {m['torch_lora'].get('threads')}" for n, m in single)
            + ". Read the torch columns together with the 'other procs' column.", ""]
  rows = []
  for name, m in part.get("models", {}).items():
    for n, prof in m.get("profile", {}).items():
      kinds = sorted(set(prof["ms_per_step"]) | set(prof["ops_in_program"]))
      rows += [[name, n, k, _f(prof["ms_per_step"].get(k)), prof["ops_in_program"].get(k, 0)]
               for k in kinds]
  if rows:
    out += ["Where our steps spend their time: a `jax.profiler` trace of "
            f"{sizes.get('steps')} steps, XLA ops grouped by kind (matmul: a dot or a fusion "
            "around one; layout copy: copy/transpose fusions), and how many of each the "
            "compiled step holds:", "",
            _table(["model", "step", "kind of op", "ms per step", "ops in program"], rows), ""]
  out += [f"![training]({rel('training.png')})", ""]
  return out


def _ms(model: dict[str, Any], kind: str) -> str:
  return _f(model[kind]["step_s"] * 1e3) if kind in model else "—"


def _div(a, b):
  return a / b if a is not None and b else None


def _utilisation_section(part: dict[str, Any]) -> list[str]:
  out = ["## 3. Utilisation", "", _measured(part), ""]
  mm = part.get("matmul", {})
  def rate(e):
    return f"{_f(e['best'])} ({_f(e['median'])})" if e else "—"

  rows = [[f"{n}×{n}", rate(e.get("jax")), rate(e.get("numpy")), rate(e.get("torch"))]
          for n, e in sorted(mm.get("square", {}).items(), key=lambda kv: int(kv[0]))]
  rows += [[f"model shape {k}", rate(e), "", ""] for k, e in mm.get("model_shapes", {}).items()]
  out += ["Float32 matmul GFLOP/s, best (median) of the repeats; 2mkn FLOPs; 'model shape' rows "
          "are the utilisation model's own matmuls, [tokens × d_in] × [d_in × d_out]:", "",
          _table(["matmul", "JAX", "NumPy", "torch"], rows), "",
          f"Peak used below: **{_f(mm.get('peak_gflops'))} GFLOP/s** (the best JAX square). "
          f"A jitted call costs {_f(mm.get('dispatch_us'))} µs to dispatch.", ""]
  rows = []
  for name, kinds in part.get("train", {}).items():
    for kind, e in kinds.items():
      rows.append([name, kind, _f(e["step_s"] * 1e3), _f(e["flops_analytic"] / 1e9),
                   _f((e["flops_xla"] or 0) / 1e9 if e["flops_xla"] else None),
                   _f(e["gflops_per_s_analytic"]), _pct(e["fraction_of_peak_analytic"]),
                   _f(e["gflops_per_s_xla"]), _pct(e["fraction_of_peak_xla"]),
                   _f(e.get("concurrent_matmul_gflops_per_s")),
                   _pct(e.get("fraction_of_concurrent_matmul_analytic")),
                   _f(e.get("other_cores"), 2)])
  out += ["Train steps (ours), each timed side by side with a square matmul ('alongside'):", "",
          _table(["model", "step", "ms", "GFLOP analytic", "GFLOP XLA", "GFLOP/s analytic",
                  "of peak", "GFLOP/s XLA", "of peak", "matmul alongside GFLOP/s",
                  "analytic of alongside", "other procs (cores)"], rows), ""]
  rows = []
  for p in part.get("scoring", []):
    for name in ("ours", "dense_map", "jax_loop"):
      e = p[name]
      rows.append([p["examples"], p["num_combinations"], name, e["route"],
                   _f(p["flops_per_combination_analytic"][e["route"]] / 1e9),
                   _f((p["flops_per_combination_xla"].get(e["route"]) or 0) / 1e9
                      if p["flops_per_combination_xla"].get(e["route"]) else None),
                   _f(e["combos_per_s"]), _f(e["gflops_per_s"]), _pct(e["fraction_of_peak"]),
                   _pct(e.get("fraction_of_concurrent_matmul")),
                   _f(p.get("concurrent_matmul_gflops_per_s")), _f(e["useful_gflops_per_s"]),
                   _f(p.get("other_cores"), 2)])
  out += [f"Scoring (K = {part.get('sizes', {}).get('num_adapters')}): FLOPs per combination "
          "counted analytically for the route each scorer takes (mix: forward + K LoRA "
          "products per adapted kernel; dense: merge + forward), cross-checked with XLA's "
          "`cost_analysis` of a single-combination program (the scorers' own programs are "
          "while loops, which XLA counts once). 'Useful' GFLOP/s counts only the dense route's "
          "FLOPs, the least work that scores a combination.", "",
          _table(["examples", "C", "scorer", "route", "GFLOP/comb analytic",
                  "GFLOP/comb XLA", "combos/s", "GFLOP/s", "of peak", "of alongside",
                  "matmul alongside GFLOP/s", "useful GFLOP/s", "other procs (cores)"], rows),
          ""]
  return out


def _scaling_section(part: dict[str, Any], rel) -> list[str]:
  base = dict(part.get("sizes", {}).get("base", []))
  out = ["## 4. Scaling of our scorer", "", _measured(part), "",
         "One dimension at a time around " + ", ".join(f"{k} = {v}" for k, v in base.items())
         + ", each with the default plan, except the chunk sweep, which fixes `chunk_size` at "
         "each (examples, C) point to check the plan's choice. Memory: XLA arguments + temps "
         "of the compiled plan; the resident-set growth during the timed calls.", "",
         f"![scaling]({rel('scaling.png')})", ""]
  from bench import scaling
  rows = []
  sweeps = part.get("sweeps", {})
  for dim in [d for d in scaling.DIMENSIONS if d in sweeps]:
    for p in sweeps[dim]:
      rows.append([dim, p["chunk"] if dim == "chunk" else p[dim], p["examples"],
                   p["num_combinations"], p["chunk"], p["plan_chunk"],
                   _f(p["seconds"]["median_s"] * 1e3), _f(p["combos_per_s"]),
                   _mib(p["xla_argument_bytes"] + p["xla_temp_bytes"]),
                   _mib(p["rss_growth_bytes"]), _f(p.get("other_cores"), 2)])
  out += [_table(["sweep", "value", "examples", "C", "chunk", "plan's chunk", "ms/call",
                  "combos/s", "XLA MiB", "RSS growth MiB", "other procs (cores)"], rows), ""]
  return out


def _packing_section(part: dict[str, Any]) -> list[str]:
  out = ["## 5. Packed pretraining", "", _measured(part), "",
         f"The default study's corpus: {part['corpus_texts']:,} texts, "
         f"{part['corpus_real_tokens']:,} real tokens; padded to {part['padded_width']} tokens "
         f"a row, {_pct(part['padded_real_fraction'])} of the tokens computed are real; packed "
         f"into {part['packed_rows']:,} rows, {_pct(part['packed_real_fraction'])}. One full "
         "train step of the study's base model per layout (`bench/packing.py`):", "",
         "| layout | rows × width | real tokens / step | ms / step | real tokens / s |",
         "|---|---|---|---|---|"]
  for name in ("padded", "packed"):
    p = part[name]
    width = p["tokens_per_step"] // p["batch_rows"]
    out.append(f"| {name} | {p['batch_rows']} × {width} | {p['real_tokens_per_step']:,} | "
               f"{_f(p['seconds_per_step'] * 1e3)} | {p['real_tokens_per_s']:,.0f} |")
  return out + ["", f"Packed / padded: **{_x(part['ratio'])}** real tokens per second.", ""]


def _e2e_section(part: dict[str, Any]) -> list[str]:
  m = part.get("measured", {})
  out = ["## 6. End to end (`make run`)", "",
         f"*Read {m.get('date_utc')} by `{m.get('command')}`; the load on the machine while the "
         "pipeline ran was not recorded.*", ""]
  if not part.get("found"):
    return out + [part.get("note", "not measured"), ""]
  stages = dict(part["stages"])
  total = stages.pop("total", None)
  seeds, kinds = [], []
  for name in stages:
    seed, _, kind = name.partition(": ")
    seeds += [seed] if seed not in seeds else []
    kinds += [kind] if kind not in kinds else []
  order = ["world", "base model", "adapters", "recycling", "evaluation"]
  kinds.sort(key=lambda k: order.index(k) if k in order else len(order))
  seeds.sort()
  out += [f"Stage wall times (seconds) from `{part['workdir']}/timings.json` (written "
          f"{part.get('timings_mtime')}; config {part.get('config')}"
          + ("" if part.get("complete", True) else
             "; **partial: some seeds were resumed from earlier results**") + ")"
          + (f"; run by `{part['ran']['command']}` in {_f(part['ran']['wall_s'])} s wall"
             if part.get("ran") else "") + ":", ""]
  rows = [[k] + [_f(stages.get(f"{s}: {k}")) for s in seeds]
          + [_f(sum(stages.get(f"{s}: {k}", 0.0) for s in seeds))] for k in kinds]
  rows.append(["**total** (all stages, tokenizer and report included)"] + [""] * len(seeds)
              + [f"**{_f(total)} s = {_f(total / 60 if total else None, 2)} min**"])
  out += [_table(["stage"] + seeds + ["all seeds"], rows), ""]
  return out


def _profile_sentence(profile: dict[str, Any], excess: bool) -> str:
  lora, full = profile.get("ours_lora"), profile.get("ours_full")
  if not lora or not full:
    return ""
  parts = []
  for kind in sorted(set(lora["ms_per_step"]) | set(full["ms_per_step"])):
    parts.append(f"{kind} {_f(lora['ms_per_step'].get(kind))} ms vs "
                 f"{_f(full['ms_per_step'].get(kind))} ms ({lora['ops_in_program'].get(kind, 0)}"
                 f" vs {full['ops_in_program'].get(kind, 0)} ops)")
  out = " Profiled (LoRA vs full, per step): " + "; ".join(parts) + "."
  if excess:
    out += (" The rank-r products are thin matmuls that stream whole activations for few "
            "FLOPs, and they bring extra layout copies of activations and gradients: "
            "memory-bound work that takes back part of what skipping the weight gradients "
            "saves.")
  return out


def _analysis(results: dict[str, Any]) -> list[str]:
  """Paragraphs computed from the numbers: what explains each missed target."""
  parts = results.get("parts", {})
  out = ["## What bounds the results", ""]
  scaling_part = parts.get("scaling", {}).get("sweeps", {})
  chunk_pts = scaling_part.get("chunk", [])
  for n in sorted({p["examples"] for p in chunk_pts}):
    pts = [p for p in chunk_pts if p["examples"] == n]
    best = max(pts, key=lambda p: p["combos_per_s"])
    worst = min(pts, key=lambda p: p["combos_per_s"])
    planned = [p for p in pts if p["chunk"] == p["plan_chunk"]]
    line = (f"- **Chunk size ({n} examples, C = {pts[0]['num_combinations']}).** Over chunks "
            f"{[p['chunk'] for p in pts]} the scorer runs {_f(worst['combos_per_s'])}–"
            f"{_f(best['combos_per_s'])} combos/s, best at chunk {best['chunk']}, worst at "
            f"{worst['chunk']} (XLA temps {_mib(best['xla_temp_bytes'])} vs "
            f"{_mib(worst['xla_temp_bytes'])} MiB). The default plan picks chunk "
            f"{pts[0]['plan_chunk']}"
            + (f" ({_pct(planned[0]['combos_per_s'] / best['combos_per_s'])} of the best rate)."
               if planned else "."))
    one = min(pts, key=lambda p: p["chunk"])
    big = max(pts, key=lambda p: p["chunk"])
    if best["chunk"] != one["chunk"]:
      gain = best["combos_per_s"] / one["combos_per_s"]
      line += (f" Vmapping combinations together gains {_x(gain)} over one at a time "
               f"(chunk {one['chunk']}) at best")
    else:
      line += " One combination at a time is fastest here"
    if big["chunk"] != best["chunk"]:
      line += (f"; the largest chunk ({big['chunk']}) runs at "
               f"{_pct(big['combos_per_s'] / best['combos_per_s'])} of the best, its "
               "intermediates (activations, logits, log-softmax) far larger than the caches.")
    else:
      line += "."
    out.append(line)
  cells = parts.get("scoring", {}).get("cells", [])
  padded = [c for c in cells if c["ours"].get("padded", 0) > 1.1 * c["num_combinations"]]
  if padded:
    out.append(
        "- **Padding.** The plan pads C up to a multiple of its chunk and scores the copies: "
        + "; ".join(f"K = {c['num_adapters']}, C = {c['num_combinations']}, {c['examples']} "
                    f"examples: chunk {c['ours']['chunk']} → {c['ours']['padded']} scored "
                    f"({_pct(c['ours']['padded'] / c['num_combinations'] - 1)} extra)"
                    for c in padded)
        + ". Chunks balanced over C (ceil(C / ceil(C / chunk))) would waste at most one "
        "combination per chunk boundary instead.")
  stacks = [lp for lp in parts.get("scoring", {}).get("loops", []) if "stack_adapters_s" in lp]
  if stacks:
    out.append(
        "- **Per-call host work.** `score_combinations` stacks the K adapters (`lora.stack`) "
        "on every call before its compiled program runs: " + ", ".join(
            f"K = {lp['num_adapters']}: {_f(lp['stack_adapters_s'] * 1e3)} ms"
            for lp in stacks if lp["examples"] == stacks[0]["examples"])
        + " — comparable to scoring a handful of few-shot combinations, so it shows at small "
        "C. A caller scoring many batches could pass the stack once.")
  phases = [lp for lp in parts.get("scoring", {}).get("loops", []) if "peft_phases" in lp]
  if phases:
    out.append(
        "- **Where the PEFT loop's time goes** (ms per combination: building the 'cat' adapter "
        "/ forward + loss / deleting it; then ours, ms per combination): " + "; ".join(
            f"{lp['examples']} examples, K = {lp['num_adapters']}: "
            f"{_f(lp['peft_phases']['build_s'] * 1e3)} / "
            f"{_f(lp['peft_phases']['forward_s'] * 1e3)} / "
            f"{_f(lp['peft_phases']['delete_s'] * 1e3)}; ours "
            f"{_f(1e3 / lp['ours']['combos_per_s'])}" for lp in phases)
        + ". Building and deleting the adapter take "
        + _range([(lp["peft_phases"]["build_s"] + lp["peft_phases"]["delete_s"])
                  / sum(lp["peft_phases"].values()) for lp in phases], _pct)
        + " of PEFT's time per combination in these groups; the rest is its forward.")
  util = parts.get("utilisation", {})
  mm = util.get("matmul", {})
  loops = parts.get("scoring", {}).get("loops", [])
  few = [lp for lp in loops if lp["examples"] == min((x["examples"] for x in loops), default=0)]
  if few and mm.get("dispatch_us"):
    per = [1e6 / lp["jax_loop"]["combos_per_s"] for lp in few]
    share = mm["dispatch_us"] / min(per)
    line = (f"- **Dispatch.** A jitted call costs {_f(mm['dispatch_us'])} µs to dispatch; one "
            f"few-shot combination takes {_f(min(per))}–{_f(max(per))} µs in the jitted loop, "
            f"so dispatch is at most {_pct(share)} of the loop's time.")
    if share < 0.2:
      gains = []
      for n in sorted({p["examples"] for p in chunk_pts}):
        pts = [p for p in chunk_pts if p["examples"] == n]
        one = min(pts, key=lambda p: p["chunk"])
        gains.append(f"{_x(max(p['combos_per_s'] for p in pts) / one['combos_per_s'])} with "
                     f"{n} examples")
      line += (" The loop is compute-bound already, so one compiled call can beat it only by "
               "doing each combination's arithmetic faster; batching combinations buys at most "
               + (", ".join(gains) if gains else "little") + " over one at a time (chunk "
               "sweep). The 5× and 20× few-shot targets assume a per-call overhead that the "
               "asynchronous dispatch of one jitted function does not have here.")
    out.append(line)
  for p in util.get("scoring", []):
    f = p["flops_per_combination_analytic"]
    if f.get("dense"):
      faster = p["dense_map"]["combos_per_s"] > p["ours"]["combos_per_s"]
      out.append(
          f"- **Route ({p['examples']} examples, K = {p['num_adapters']}).** Scoring a "
          f"combination on the unmerged mixing route (what `score_combinations(method='mix')` "
          f"always does) costs {_x(f['mix'] / f['dense'])} the matmul FLOPs of merging "
          "W + Σ_k w_k ΔW_k and running the plain forward; measured: dense_map "
          f"{_f(p['dense_map']['combos_per_s'])} vs ours "
          f"{_f(p['ours']['combos_per_s'])} combos/s, so the "
          + ("merged route is faster here." if faster else "mixing route is faster here."))
  shapes = {k: v["best"] for k, v in mm.get("model_shapes", {}).items()}
  if shapes and mm.get("peak_gflops"):
    d = util.get("sizes", {}).get("model", {}).get("d_model")
    out.append(
        f"- **Narrow matmuls.** The utilisation model's matmul shapes (d = {d}) run at "
        f"{_f(min(shapes.values()))}–{_f(max(shapes.values()))} GFLOP/s on their own, against "
        f"a square peak of {_f(mm['peak_gflops'])}; a forward interleaves them with attention, "
        "softmax, norms and the loss, which run far below peak.")
  for name, m in parts.get("training", {}).get("models", {}).items():
    r = m["ratios"]
    xla = _div(m["ours_lora"].get("flops_xla"), m["ours_full"].get("flops_xla"))
    out.append(
        f"- **LoRA vs full ({name}).** A LoRA step takes {_x(r['ours_lora_step/ours_full_step'])} "
        f"the time of a full step; by matmul count the ideal is "
        f"{_x(r['ideal_lora/full_flops'])} and XLA counts {_x(xla)}: no weight gradient is "
        "formed for frozen kernels (the step differentiates only the adapter), but the input "
        "gradients, attention, the (tied, frozen) lm head and all element-wise work remain."
        + _profile_sentence(m.get("profile", {}), r["ours_lora_step/ours_full_step"]
                            > r["ideal_lora/full_flops"] + 0.05))
  if len(out) == 2:
    out.append("(nothing measured yet)")
  return out + [""]


def render(results: dict[str, Any], figures_dir: pathlib.Path, markdown_path: pathlib.Path) -> str:
  """The whole BENCHMARKS.md."""
  def rel(name: str) -> str:
    return os.path.relpath(figures_dir / name, markdown_path.parent)

  parts = results.get("parts", {})
  out = ["# Benchmarks", "",
         "Generated by `bench/run.py` from `" + os.path.relpath(
             figures_dir.parent / "results.json", markdown_path.parent)
         + "`; do not edit by hand. Regenerate with `make bench` (all parts, ~15 min on an "
         "idle machine) or "
         "`python -m bench.run --parts=<part>` (one part, merged into the existing results). "
         "Benchmarks are not tests: `make test` only checks that the harness runs "
         "(`tests/test_bench_smoke.py`).", "",
         "Commands (mode " + str(results.get("mode")) + "; each part below names its own): "
         + ", ".join(f"`{c}`" for c in dict.fromkeys(
             p["measured"]["command"] for p in parts.values() if "measured" in p))
         + ". Machine, at the latest of them:", "",
         _machine(results), "",
         "Every part below states its own date, command and how many cores other processes "
         "kept busy while it ran (from /proc/stat), and every table gives that figure for its "
         "own rows: this machine's two cores may be shared, and a number measured while other "
         "processes ran is slower than the machine can do (torch's far more than XLA's). "
         "Contenders are timed side by side in interleaved rounds, so their ratios are fairer "
         "than their absolute rates. `--max_other_cores=0.3` makes the harness wait for a "
         "quiet machine before each part and each timed round.", "",
         "## Targets", ""]
  rows = [[t["target"], t["ours"] or "not measured", _met(t["met"]), t["dense_map"] or "—",
           _met(t["met_dense_map"]), t["source"]] for t in results.get("targets", [])]
  out += [_table(["target", "measured (ours, as shipped)", "", "merged-route prototype "
                  "(dense_map, bench only)", "", "from"], rows), ""]
  out += _analysis(results)
  sections = {"scoring": ("1. Scoring combinations", lambda p: _scoring_section(p, rel)),
              "training": ("2. LoRA training", lambda p: _training_section(p, rel)),
              "utilisation": ("3. Utilisation", _utilisation_section),
              "scaling": ("4. Scaling of our scorer", lambda p: _scaling_section(p, rel)),
              "packing": ("5. Packed pretraining", _packing_section),
              "e2e": ("6. End to end (`make run`)", _e2e_section)}
  for name, (title, section) in sections.items():
    if name not in parts:
      continue
    if "error" in parts[name]:
      out += [f"## {title}", "", _measured(parts[name]), "",
              "**This part failed**; its traceback is in results.json.", ""]
    else:
      out += section(parts[name])
  return "\n".join(line for line in out) + "\n"
