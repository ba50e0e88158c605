"""`python -m bench.run` (what `make bench` runs): every benchmark part, results.json and
BENCHMARKS.md.

  python -m bench.run                                   # full: bench/results.json, BENCHMARKS.md
  python -m bench.run --mode=quick                      # ~1 minute, into runs/bench-quick/
  python -m bench.run --parts=scoring,training          # rerun some parts, keep the others
  python -m bench.run --render_only                     # BENCHMARKS.md from results.json
  python -m bench.run --parts=e2e --e2e_run             # time `make run`'s pipeline once

Parts: scoring (three contenders on identical weights; memory budget check), training
(our LoRA step vs torch + PEFT, LoRA vs full), utilisation (matmul peak vs achieved FLOP/s),
scaling (time and memory vs C, K, rank, examples, width, chunk), e2e (`make run` wall time by
stage, read from <e2e_workdir>/timings.json). A rerun of some parts merges into an existing
results file of the same mode. Benchmarks are not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench import common  # noqa: E402
from bench import packing  # noqa: E402
from bench import report  # noqa: E402
from bench import scaling  # noqa: E402
from bench import scoring  # noqa: E402
from bench import training  # noqa: E402
from bench import utilisation  # noqa: E402
from lora_limits.models import transformer  # noqa: E402

PARTS = ("scoring", "training", "utilisation", "scaling", "packing", "e2e")
MODES = ("full", "quick", "tiny")
E2E_CONFIG = "configs/two_hop.py"
_TINY_MODEL = transformer.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=48,
                                      max_len=16)
# The smoke study's world sizes (configs/smoke.py): the packing part in tests.
_TINY_WORLD = (("test_chains", 4), ("target_chains", 4), ("filler_chains", 24), ("pool_size", 4),
               ("background_exposure", 1), ("fact_exposure", 1), ("filler_repeats", 1))


@dataclasses.dataclass(frozen=True)
class Options:
  """What to run and where to write it (defaults: the full benchmark into the repository)."""

  parts: tuple[str, ...] = PARTS
  mode: str = "full"
  out_dir: pathlib.Path | None = None  # results.json and figures/; default by mode
  markdown: pathlib.Path | None = None  # default by mode
  scratch: pathlib.Path | None = None  # exported checkpoints (a temporary dir if None)
  e2e_workdir: pathlib.Path = common.REPO / "runs" / "default"
  e2e_run: bool = False  # run the pipeline when e2e_workdir has no timings.json
  e2e_config: str = E2E_CONFIG
  command: str = "python -m bench.run"
  render_only: bool = False
  full_grid: bool = False  # full mode: every C also at the largest examples value (+~15 min)
  max_other_cores: float | None = None  # wait (each part, each round) for a quieter machine
  wait_timeout_s: float = 1200.0
  round_timeout_s: float = 120.0  # the longest wait for quiet before one timed round

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r} is not one of {list(MODES)}")
    bad = [p for p in self.parts if p not in PARTS]
    if bad or not self.parts:
      raise ValueError(f"parts {bad or list(self.parts)} are not among {list(PARTS)}")

  @property
  def results_dir(self) -> pathlib.Path:
    if self.out_dir is not None:
      return pathlib.Path(self.out_dir)
    return common.REPO / ("bench" if self.mode == "full" else f"runs/bench-{self.mode}")

  @property
  def markdown_path(self) -> pathlib.Path:
    if self.markdown is not None:
      return pathlib.Path(self.markdown)
    return (common.REPO / "BENCHMARKS.md" if self.mode == "full"
            else self.results_dir / "BENCHMARKS.md")


def sizes_for(mode: str, full_grid: bool = False) -> dict[str, Any]:
  """The sizes of every part in `mode`: full (~15 min), quick (~1 min), tiny (tests).

  full_grid: in full mode, score every C at 128 examples too (compute-bound cells cost about
  C / 20 seconds each per contender here; the default stops at C = 256 there, since the rate
  per combination is flat in C once a chunk is full).
  """
  if mode == "full":
    grid = scoring.ScoringSizes()
    if full_grid:
      grid = dataclasses.replace(grid, combinations=(grid.combinations[0],) * 2)
    return {"scoring": grid, "training": training.TrainingSizes(),
            "utilisation": utilisation.UtilisationSizes(), "scaling": scaling.ScalingSizes(),
            "packing": packing.PackingSizes()}
  if mode == "quick":
    default = transformer.ModelConfig()
    return {
        "scoring": scoring.ScoringSizes(num_adapters=(4,), combinations=((64,), (16,)),
                                        loop_tokens=4096, repeats=2, budget_s=1.0,
                                        memory_combinations=(64, 65536)),
        "training": training.TrainingSizes(models=(("default", default),), steps=3,
                                           repeats=2, check_steps=2),
        "utilisation": utilisation.UtilisationSizes(
            square=(1024,), train_models=(("default", default),), scoring_points=((8, 64),),
            train_steps=3, repeats=2),
        "scaling": scaling.ScalingSizes(num_combinations=(16, 256), num_adapters=(2, 8),
                                        rank=(8,), examples=(8,), d_model=(128,),
                                        chunk=(1, 64), chunk_points=((8, 64),), repeats=1,
                                        budget_s=1.0),
        "packing": packing.PackingSizes(steps=3, repeats=2)}
  tiny = dict(model=_TINY_MODEL, seq_len=8)
  return {
      "scoring": scoring.ScoringSizes(**tiny, rank=2, num_adapters=(2,), examples=(2, 4),
                                      combinations=((4,), (4,)), loop_tokens=32, repeats=1,
                                      budget_s=0.5, memory_combinations=(4096,),
                                      memory_budgets=(2**20,)),
      "training": training.TrainingSizes(models=(("tiny", _TINY_MODEL),), batch_size=4,
                                         seq_len=8, rank=2, steps=1, repeats=1, check_steps=2),
      "utilisation": utilisation.UtilisationSizes(
          square=(64,), model=_TINY_MODEL, train_models=(("tiny", _TINY_MODEL),),
          batch_size=4, seq_len=8, rank=2, num_adapters=2, scoring_points=((2, 4),),
          train_steps=1, repeats=1),
      "scaling": scaling.ScalingSizes(**tiny, num_combinations=(4,), num_adapters=(2,),
                                      rank=(2,), examples=(2,), d_model=(32,), chunk=(1, 4),
                                      chunk_points=((2, 4),),
                                      base=(("num_combinations", 4), ("num_adapters", 2),
                                            ("rank", 2), ("examples", 2), ("d_model", 32)),
                                      repeats=1, budget_s=0.5),
      "packing": packing.PackingSizes(padded_batch=4, packed_batch=2, row_len=64, steps=1,
                                      repeats=1, world_overrides=_TINY_WORLD,
                                      model_overrides=(("d_model", 32), ("n_layers", 1),
                                                       ("n_heads", 2), ("d_ff", 48)))}


def log(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def e2e(options: Options) -> dict[str, Any]:
  """Stage timings of the default pipeline, from <e2e_workdir>/timings.json (run once if
  asked and missing)."""
  workdir = pathlib.Path(options.e2e_workdir)
  path = workdir / "timings.json"
  ran = None
  if not path.exists() and options.e2e_run:
    command = [sys.executable, "-m", "experiments.run", f"--config={options.e2e_config}",
               f"--workdir={workdir}"]
    log(f"e2e: running {' '.join(command)}")
    start = time.time()
    subprocess.run(command, cwd=common.REPO, check=True)
    ran = {"command": " ".join(shlex.quote(c) for c in command[1:]),
           "wall_s": time.time() - start}
  if not path.exists():
    return {"workdir": str(workdir), "found": False,
            "note": f"no {path}; run `make run` (or pass --e2e_run) first"}
  timings = json.loads(path.read_text())
  shown = os.path.relpath(workdir, common.REPO) if workdir.is_absolute() else str(workdir)
  out: dict[str, Any] = {"workdir": shown, "found": True, "stages": timings,
                         "timings_mtime": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(
                             path.stat().st_mtime))}
  config_path = workdir / "config.json"
  if config_path.exists():
    config = json.loads(config_path.read_text())
    seeds = config.get("seeds") or []
    out["config"] = {k: config.get(k) for k in ("study", "task", "seeds") if k in config}
    out["config"]["pretrain_steps"] = (config.get("pretrain") or {}).get("steps")
    stages = [s for s in timings if s != "total"]
    out["complete"] = all(any(s.startswith(f"seed {seed}:") for s in stages) for seed in seeds)
  if ran is not None:
    out["ran"] = ran
  return out


def _load(path: pathlib.Path, mode: str) -> dict[str, Any]:
  if path.exists():
    old = json.loads(path.read_text())
    if old.get("mode") == mode:
      return old
  return {"mode": mode, "parts": {}}


def run(options: Options) -> dict[str, Any]:
  """Run the selected parts, merge them into the results file, write it and the markdown."""
  results_path = options.results_dir / "results.json"
  figures = options.results_dir / "figures"
  results = _load(results_path, options.mode)
  failed: list[str] = []
  if not options.render_only:
    sizes = sizes_for(options.mode, options.full_grid)
    results["machine"] = common.machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
      scratch = pathlib.Path(options.scratch or tmp)
      for part in options.parts:
        quiet = None
        if options.max_other_cores is not None and part != "e2e":
          quiet = common.wait_for_quiet(options.max_other_cores, options.wait_timeout_s, log)
        before, start = common.load_average(), time.time()
        log(f"part {part}: start (load average {before})")
        with common.OtherCpu() as others:
          try:
            out = _run_part(part, sizes, scratch, options)
          except Exception:  # noqa: BLE001 - recorded, the other parts still run
            out = {"error": traceback.format_exc()}
            failed.append(part)
            log(f"part {part}: FAILED\n{out['error']}")
        out["measured"] = {"date_utc": common.machine_info()["date_utc"],
                           "load_before": before, "load_after": common.load_average(),
                           "other_cores_during": others.cores, "waited_for_quiet": quiet,
                           "seconds": time.time() - start, "command": options.command,
                           "git_commit": results["machine"]["git_commit"]}
        results["parts"][part] = out
        log(f"part {part}: done in {time.time() - start:.0f}s"
            + (f"; other processes kept {others.cores:.2f} cores busy meanwhile"
               if others.cores == others.cores else ""))
  if not options.render_only:
    results["command"] = options.command
  results["targets"] = report.targets(results)
  results = common.round_floats(results)
  results_path.parent.mkdir(parents=True, exist_ok=True)
  results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
  report.figures(results, figures)
  markdown = report.render(results, figures, options.markdown_path)
  options.markdown_path.parent.mkdir(parents=True, exist_ok=True)
  options.markdown_path.write_text(markdown)
  log(f"wrote {results_path} and {options.markdown_path}")
  if failed:
    raise RuntimeError(f"benchmark parts {failed} failed (their tracebacks are in {results_path})")
  return results


def _run_part(part: str, sizes: dict[str, Any], scratch: pathlib.Path,
              options: Options) -> dict[str, Any]:
  quiet = (None if options.max_other_cores is None
           else common.Quiet(options.max_other_cores, timeout_s=options.round_timeout_s))
  if part == "scoring":
    out = scoring.run(sizes["scoring"], scratch / "scoring", log, quiet)
    out["memory_check"] = scoring.memory_check(sizes["scoring"], scratch / "memory", log=log)
    return out
  if part == "training":
    return training.run(sizes["training"], scratch / "training", log, quiet)
  if part == "utilisation":
    return utilisation.run(sizes["utilisation"], scratch / "utilisation", log, quiet)
  if part == "scaling":
    return scaling.run(sizes["scaling"], log, quiet)
  if part == "packing":
    return packing.run(sizes["packing"], log, quiet)
  return e2e(options)


def main(argv: list[str] | None = None) -> None:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--parts", default=",".join(PARTS),
                      help=f"comma-separated subset of {','.join(PARTS)}")
  parser.add_argument("--mode", default="full", choices=MODES)
  parser.add_argument("--quick", action="store_true", help="same as --mode=quick")
  parser.add_argument("--out_dir", default=None, help="results.json + figures/ directory")
  parser.add_argument("--markdown", default=None, help="the BENCHMARKS.md to write")
  parser.add_argument("--scratch", default=None, help="directory for exported checkpoints")
  parser.add_argument("--e2e_workdir", default=str(common.REPO / "runs" / "default"))
  parser.add_argument("--e2e_run", action="store_true",
                      help="run the pipeline if e2e_workdir has no timings.json")
  parser.add_argument("--e2e_config", default=E2E_CONFIG)
  parser.add_argument("--render_only", action="store_true")
  parser.add_argument("--max_other_cores", type=float, default=None,
                      help="before each part (up to --wait_timeout_s) and each timed round "
                           "(up to 60 s), wait until other processes use fewer cores than "
                           "this (e.g. 0.3 on a shared machine)")
  parser.add_argument("--wait_timeout_s", type=float, default=1200.0,
                      help="the longest wait for quiet before a part")
  parser.add_argument("--round_timeout_s", type=float, default=120.0,
                      help="the longest wait for quiet before one timed round")
  parser.add_argument("--full_grid", action="store_true",
                      help="full mode: every C at 128 examples too (about 15 min more)")
  args = parser.parse_args(argv)
  command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
  parts = tuple(p for p in args.parts.split(",") if p)
  options = Options(parts=parts, mode="quick" if args.quick else args.mode,
                    out_dir=pathlib.Path(args.out_dir) if args.out_dir else None,
                    markdown=pathlib.Path(args.markdown) if args.markdown else None,
                    scratch=pathlib.Path(args.scratch) if args.scratch else None,
                    e2e_workdir=pathlib.Path(args.e2e_workdir), e2e_run=args.e2e_run,
                    e2e_config=args.e2e_config, command=command.strip(),
                    render_only=args.render_only, full_grid=args.full_grid,
                    max_other_cores=args.max_other_cores, wait_timeout_s=args.wait_timeout_s,
                    round_timeout_s=args.round_timeout_s)
  try:
    import transformers
    transformers.utils.logging.disable_progress_bar()
  except ImportError:
    pass
  run(options)


if __name__ == "__main__":
  main()
