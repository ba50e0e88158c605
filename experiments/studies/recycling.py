"""Study 'recycling': the paper's experiment (two-hop or math), then its report."""

from __future__ import annotations

import pathlib

from experiments import pipeline
from experiments import report


def main(config, workdir: pathlib.Path) -> None:
  cfg = pipeline.parse(config)
  results = pipeline.run(cfg, workdir)
  if results is not None:  # None: other shards' seeds unfinished, or not process 0
    report.write_report(workdir, results)
