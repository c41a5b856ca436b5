"""Prometheus text exposition of the spool's state and the worker's counters.

``render_metrics`` turns a status dict (``status.spool_status``, or the
worker's own gauges) and the worker's counters into the text format
node_exporter's textfile collector reads: queue depth and oldest age per
state, whether a worker is up, requests served by op and outcome, and the
operation duration histogram.  No I/O.

The counters come from the worker account (its stats snapshot, read by
``spoolops status --prometheus``), op names from web users: label values are
escaped as the exposition format requires (backslash, double quote, line
feed), and a sample whose value is not a number is left out rather than
written raw -- text there could end the line and forge other samples.
"""

from __future__ import annotations

from typing import Any

from .status import STATES


def _label(value: str) -> str:
    """A label value as the exposition format spells it: ``\\``, ``\\"`` and
    ``\\n`` escaped (the only escapes it has); any other character is allowed
    but must be UTF-8, so a lone surrogate (from JSON) becomes U+FFFD."""
    text = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _value(value: Any) -> str | None:
    """A sample value from the worker's counters; None (the sample is left
    out) unless it is a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return _num(value)


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
            value = _value(outcomes[op][outcome])
            if value is not None:
                lines.append(f'spoolops_served_total{{op="{_label(op)}",'
                             f'outcome="{_label(outcome)}"}} {value}')
    histograms = (stats or {}).get("histograms", {})
    bounds = (stats or {}).get("buckets", [])
    lines += ["# HELP spoolops_operation_seconds Time operations took to run.",
              "# TYPE spoolops_operation_seconds histogram"]
    for op in sorted(histograms):
        hist = histograms[op]
        label = _label(op)
        count = _value(hist["count"])
        total = _value(hist["sum"])
        if count is None or total is None:
            continue        # not the worker's own counters: no histogram for this op
        for bound, bucket in zip(bounds, hist["buckets"], strict=False):
            value = _value(bucket)
            if value is not None and _value(bound) is not None:
                lines.append(f'spoolops_operation_seconds_bucket{{op="{label}",'
                             f'le="{bound:g}"}} {value}')
        lines.append(f'spoolops_operation_seconds_bucket{{op="{label}",le="+Inf"}} {count}')
        lines.append(f'spoolops_operation_seconds_sum{{op="{label}"}} {_num(float(total))}')
        lines.append(f'spoolops_operation_seconds_count{{op="{label}"}} {count}')
    return "\n".join(lines) + "\n"
