"""Question–answer JSON-lines files: a practitioner's own evaluation and few-shot data.

One JSON object per line: `{"prompt": str, "answer": str}` and optionally `"group": str`
(results are also reported per group). Other fields are kept in `meta` and otherwise ignored.
Every problem is a ValueError naming the file and the line: a line that is empty or not a
JSON object, a missing or empty `prompt` / `answer`, a `group` that is not a string, a file
without any record or not UTF-8.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

REQUIRED = ("prompt", "answer")


@dataclasses.dataclass(frozen=True)
class QA:
  """One question; `line` is its 1-based line in `source`."""

  prompt: str
  answer: str
  group: str
  source: str
  line: int
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def parse_lines(lines: Iterable[str], source: str, default_group: str = "all") -> list[QA]:
  """Records of the lines of a QA JSON-lines text (see the module docstring)."""
  out = []
  for i, raw in enumerate(lines, start=1):
    where = f"{source}: line {i}"
    text = raw.rstrip("\r\n")
    if not text.strip():
      raise ValueError(f"{where} is empty; every line must be a JSON object with "
                       f"{list(REQUIRED)} (and optionally 'group')")
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where} is not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
      raise ValueError(f"{where} is a JSON {type(record).__name__}; expected an object with "
                       f"{list(REQUIRED)}")
    for field in REQUIRED:
      if field not in record:
        raise ValueError(f"{where} lacks the field {field!r} (has {sorted(record)}); required: "
                         f"{list(REQUIRED)}")
      if not isinstance(record[field], str) or not record[field].strip():
        raise ValueError(f"{where}: {field!r} must be a non-empty string, got "
                         f"{record[field]!r}")
    group = record.get("group", default_group)
    if not isinstance(group, str) or not group:
      raise ValueError(f"{where}: 'group' must be a non-empty string, got {group!r}")
    meta = {k: v for k, v in record.items() if k not in REQUIRED + ("group",)}
    out.append(QA(record["prompt"], record["answer"], group, source, i, meta))
  if not out:
    raise ValueError(f"{source} holds no records; expected one JSON object per line with "
                     f"{list(REQUIRED)}")
  return out


def read(path: str | pathlib.Path) -> list[QA]:
  """The records of a QA JSON-lines file (ValueError naming the file and line)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"{str(path)!r} is not a file")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
  lines = text.split("\n")
  if lines and lines[-1] == "":  # the newline that ends the last line
    lines.pop()
  return parse_lines(lines, str(path))


def overlap(a: Sequence[QA], b: Sequence[QA]) -> list[tuple[QA, QA]]:
  """Pairs (x in a, y in b) with the same prompt (after whitespace normalisation)."""
  seen = {" ".join(x.prompt.split()): x for x in a}
  return [(seen[k], y) for y in b if (k := " ".join(y.prompt.split())) in seen]
