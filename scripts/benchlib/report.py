"""The bench's output: the table on stdout, the JSON file, the PNG plot.

Trusts: the figures it is handed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def judge(row: dict[str, Any]) -> dict[str, Any]:
    """Fill in ``ratio`` (spoolops / baseline, unless given) and ``met``."""
    sp, base = row.get("spoolops"), row.get("baseline")
    if "ratio" not in row:
        ok = isinstance(sp, (int, float)) and isinstance(base, (int, float)) and base
        row["ratio"] = sp / base if ok else None
    target, ratio = row.get("target"), row["ratio"]
    if isinstance(ratio, float) and math.isnan(ratio):
        row["ratio"] = ratio = None
    if target is None or ratio is None:
        row["met"] = None
    else:
        op, limit = target
        row["met"] = ratio <= limit if op == "<=" else ratio >= limit
    return row


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    digits = 3 if abs(value) < 10 else (1 if abs(value) < 1000 else 0)
    return f"{value:.{digits}f}{(' ' + unit) if unit else ''}"


def table(rows: list[dict[str, Any]], rst: bool = False) -> str:
    """The rows as plain text (stdout), or as an RST simple table (``rst``)."""
    head = ("workload", "spoolops", "baseline", "ratio", "target", "result")
    lines = []
    for r in rows:
        unit = r.get("unit", "")
        target = r.get("target")
        lines.append((
            r["workload"], _fmt(r.get("spoolops"), unit),
            f"{r.get('baseline_name', '')}: {_fmt(r.get('baseline'), unit)}"
            if r.get("baseline_name") else _fmt(r.get("baseline"), unit),
            _fmt(r.get("ratio")) + ("x" if r.get("ratio") is not None else ""),
            f"{target[0]} {target[1]:g}x" if target else "-",
            {True: "met", False: "MISSED", None: r.get("note", "-")}[r.get("met")]))
    lines = [tuple(c if len(c) <= 60 else c[:57] + "..." for c in line) for line in lines]
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    rule = "  ".join(("=" if rst else "-") * w for w in widths)
    out = [rule] if rst else []
    out.append("  ".join(str(c).ljust(w) for c, w in zip(head, widths, strict=True)).rstrip())
    out.append(rule)
    out += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]
    if rst:
        out.append(rule)
    return "\n".join(out)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def plot(path: Path, echo: dict[str, Any], machine: dict[str, Any]) -> bool:
    """Median echo latency against concurrent clients; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_level in echo.items():
        levels = sorted(int(lv) for lv in by_level)
        ax.plot(levels, [by_level[str(lv)]["median_ms"] for lv in levels], marker="o",
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.set_xlabel("concurrent client processes")
    ax.set_ylabel("median echo round trip (ms)")
    ax.set_title(f"echo latency vs load ({machine['cores']} cores, {machine['cpu'][:40]})",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
