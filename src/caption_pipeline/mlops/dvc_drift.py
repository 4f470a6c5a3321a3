"""What differs between the committed dvc.yaml and the one `dvc_stages` generates, said as a
person would fix it: "stage ingest: params missing conf/coco/parameters.yml:dataset", one line
per missing or extra dep, param, out, metric or plot, then a diff of the text (comments)."""

from __future__ import annotations

import difflib
from typing import Any

import yaml


def drift(committed: str, generated: str) -> list[str]:
    """What `committed` (dvc.yaml as it is) lacks or has beyond `generated`, one line per
    stage and dep, param (`file:key`), out or metric; the plots; then, when only comments or
    layout differ, a unified diff. Empty: the same text."""
    if committed == generated:
        return []
    old, new = yaml.safe_load(committed) or {}, yaml.safe_load(generated)
    old_stages, new_stages = old.get("stages") or {}, new["stages"]
    lines = [f"stage {name}: missing" for name in new_stages if name not in old_stages]
    lines += [
        f"stage {name}: extra (no such pipeline)" for name in old_stages if name not in new_stages
    ]
    for name in (n for n in new_stages if n in old_stages):
        for field in ("cmd", "deps", "params", "outs", "metrics"):
            have = _entries(old_stages[name].get(field))
            want = _entries(new_stages[name].get(field))
            lines += [f"stage {name}: {field} missing {e}" for e in want if e not in have]
            lines += [f"stage {name}: {field} extra {e}" for e in have if e not in want]
        extra = set(old_stages[name]) - {"cmd", "deps", "params", "outs", "metrics"}
        lines += [f"stage {name}: extra field {field}" for field in sorted(extra)]
    if old.get("plots") != new.get("plots"):
        lines.append("plots: differ")
    if not lines:
        lines = [
            "the same stages; comments or layout differ:",
            *difflib.unified_diff(
                committed.splitlines(), generated.splitlines(), "dvc.yaml", "generated", lineterm=""
            ),
        ]
    return lines


def _entries(value: Any) -> list[str]:
    """A stage field as comparable strings: `path`, `path {flags}`, `file:key` (`file:` for a
    whole params file)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    entries = []
    for item in value:
        if not isinstance(item, dict):
            entries.append(str(item))
            continue
        for key, inner in item.items():
            if isinstance(inner, list):  # params: file -> keys
                entries += [f"{key}:{k}" for k in inner]
            elif isinstance(inner, dict):  # an out with flags
                entries.append(f"{key} {inner}")
            else:
                entries.append(f"{key}:")
    return entries
