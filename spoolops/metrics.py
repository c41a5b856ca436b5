"""Prometheus text exposition of the spool's state and the worker's counters.

``render_metrics`` turns a status dict (``status.spool_status``, or the
worker's own gauges) and the worker's counters into the text format
node_exporter's textfile collector reads: queue depth and oldest age per
state, whether a worker is up, requests served by op and outcome, and the
operation duration histogram.  No I/O; trusts the counters (the worker's).
"""

from __future__ import annotations

from typing import Any

from .status import STATES


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def render_metrics(status: dict[str, Any], stats: dict[str, Any] | None) -> str:
    lines = [
        "# HELP spoolops_requests Requests in each state of the spool.",
        "# TYPE spoolops_requests gauge",
    ]
    for state in STATES:
        count = status[state]["count"]
        if count is not None:
            lines.append(f'spoolops_requests{{state="{state}"}} {count}')
    lines += [("# HELP spoolops_oldest_age_seconds Age of the oldest entry in each state"
              " (0 when empty)."), "# TYPE spoolops_oldest_age_seconds gauge"]
    for state in STATES:
        if status[state]["count"] is not None:
            age = status[state]["oldest_age_s"] or 0.0
            lines.append(f'spoolops_oldest_age_seconds{{state="{state}"}} {_num(float(age))}')
    lines += ["# HELP spoolops_worker_up 1 if a worker holds the spool's lock.",
              "# TYPE spoolops_worker_up gauge",
              f"spoolops_worker_up {1 if status['worker']['alive'] else 0}"]
    hooks = status.get("hooks")
    if hooks is not None:
        lines += [("# HELP spoolops_hooks Follow-up hook calls that failed and wait for a"
                   " retry (failed: 5 tries or more)."), "# TYPE spoolops_hooks gauge"]
        lines += [f'spoolops_hooks{{state="{state}"}} {hooks[state]}'
                  for state in ("pending", "failed")]
    outcomes = (stats or {}).get("outcomes", {})
    lines += [("# HELP spoolops_served_total Requests answered by the running worker, by op"
              " and outcome."), "# TYPE spoolops_served_total counter"]
    for op in sorted(outcomes):
        for outcome in sorted(outcomes[op]):
            lines.append(f'spoolops_served_total{{op="{_label(op)}",outcome="{_label(outcome)}"}}'
                         f" {outcomes[op][outcome]}")
    histograms = (stats or {}).get("histograms", {})
    bounds = (stats or {}).get("buckets", [])
    lines += ["# HELP spoolops_operation_seconds Time operations took to run.",
              "# TYPE spoolops_operation_seconds histogram"]
    for op in sorted(histograms):
        hist = histograms[op]
        label = _label(op)
        for bound, count in zip(bounds, hist["buckets"], strict=False):
            lines.append(f'spoolops_operation_seconds_bucket{{op="{label}",le="{bound:g}"}} {count}')
        lines.append(f'spoolops_operation_seconds_bucket{{op="{label}",le="+Inf"}} {hist["count"]}')
        lines.append(f'spoolops_operation_seconds_sum{{op="{label}"}} {_num(float(hist["sum"]))}')
        lines.append(f'spoolops_operation_seconds_count{{op="{label}"}} {hist["count"]}')
    return "\n".join(lines) + "\n"
