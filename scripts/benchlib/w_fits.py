"""Workloads 2-4: ``update_headers`` against the astropy way, and head-of-line.

All spoolops figures are client round trips of ``Client.call("update_headers")``
from a client process to the ``durable = yes`` worker (the production
setting: journal and fsyncs included).  The astropy figures are the edit's
own time inside the old HTTP server (``benchlib.astropy_way``), without the
HTTP round trip, so they are the cheapest the old way can be.

2. head-of-line: echo p99 from another client while a ``.fits.bz2`` edit
   runs, against the same client's idle p99; the same on old-http.
3. plain files of three sizes, same header: in place, so size-independent.
4. ``.fits.bz2`` and ``.fits.gz``: first edit (full recompression, in
   parallel chunks) and repeat edit (only the first stream) vs astropy's.

Trusts: the bench's temporary folder and the systems it is handed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import fitsgen
from .common import median, percentile
from .systems import Systems

MB = 2**20
QA = {"Pass": {"RAWGEMQA": "USABLE", "RAWPIREQ": "YES"},
      "Fail": {"RAWGEMQA": "BAD", "RAWPIREQ": "NO"}}
_pristine: dict[int, dict[str, Path]] = {}


def _label(size: int) -> str:
    return f"{size // 1024 // MB} GB" if size >= 1024 * MB else f"{size // MB} MB"


def pristine(base: Path, size: int, log: Any) -> dict[str, Path]:
    """Single-stream ``.fits.bz2`` and ``.fits.gz`` of ``size`` bytes of data, made once."""
    if size not in _pristine:
        base.mkdir(parents=True, exist_ok=True)
        log(f"generating {_label(size)} .fits.bz2 and .fits.gz")
        _pristine[size] = fitsgen.write_compressed(base, f"pristine-{size}", size, ("bz2", "gz"))
    return _pristine[size]


def _sp_edit(systems: Systems, name: str, qa: str, op_times: list | None = None) -> float:
    """Round trip of one ``update_headers`` (the worker's own op time goes to ``op_times``)."""
    out = systems.shared("spoolops/on").run_one(
        0, {"cmd": "call", "op": "update_headers", "timeout": 1200,
            "args": {"filename": name, "values": {"qa_state": qa}}})
    if not out["ok"] or not out["result"]["modified"]:
        raise RuntimeError(f"update_headers {name}: {out['error'] or out['result']}")
    if op_times is not None:
        op_times.append(out["op_s"])
    return out["lat"]


def _astropy_edit(systems: Systems, path: Path, qa: str, client: int = 0) -> float:
    out = systems.shared("old-http").run_one(
        client, {"cmd": "call", "op": "astropy_update", "timeout": 1200,
                 "args": {"path": str(path), "values": QA[qa]}})
    if not out["ok"]:
        raise RuntimeError(f"astropy_update {path}: {out['error']}")
    return out["result"]["seconds"]


def run_plain(base: Path, systems: Systems, quick: bool, results: dict[str, Any],
              rows: list[dict[str, Any]], log: Any) -> None:
    sizes = (1 * MB, 20 * MB, 100 * MB) if quick else (1 * MB, 100 * MB, 1024 * MB)
    reps = 5 if quick else 7
    storage = systems.trees["on"].storage
    res: dict[str, Any] = {}
    for size in sizes:
        name = f"plain-{size // MB}.fits"
        path = storage / name
        real = fitsgen.write_fits(path, size)
        try:
            # spoolops always sets Pass and astropy Fail, so every edit changes the file
            _sp_edit(systems, name, "Pass")        # warm-up, untimed
            _astropy_edit(systems, path, "Fail")
            sp, ap, op = [], [], []
            for _ in range(reps):
                sp.append(_sp_edit(systems, name, "Pass", op))
                ap.append(_astropy_edit(systems, path, "Fail"))
        finally:
            path.unlink()
        res[_label(size)] = {"bytes": real, "spoolops_s": sp, "astropy_s": ap,
                             "spoolops_op_s": op, "spoolops_median_ms": 1e3 * median(sp),
                             "spoolops_op_median_ms": 1e3 * median(op),
                             "astropy_median_ms": 1e3 * median(ap)}
        log(f"plain {_label(size)}: spoolops {1e3 * median(sp):.1f} ms round trip"
            f" ({1e3 * median(op):.0f} ms in the op), astropy {1e3 * median(ap):.1f} ms")
    results["plain"] = res
    small, big = _label(sizes[0]), _label(sizes[-1])
    rows.append({"workload": f"3 plain edit {big} vs {small}",
                 "spoolops": res[big]["spoolops_median_ms"],
                 "baseline": res[small]["spoolops_median_ms"],
                 "baseline_name": f"spoolops {small}", "unit": "ms", "target": ("<=", 2.0)})
    for label in (small, big):
        rows.append({"workload": f"3 plain edit {label} vs astropy-update",
                     "spoolops": res[label]["spoolops_median_ms"],
                     "baseline": res[label]["astropy_median_ms"],
                     "baseline_name": "astropy-update", "unit": "ms",
                     "target": ("<=", 5.0) if label == big else None})
    rows.append({"workload": f"3 (op time only) plain edit {big} vs astropy-update",
                 "spoolops": res[big]["spoolops_op_median_ms"],
                 "baseline": res[big]["astropy_median_ms"], "baseline_name": "astropy-update",
                 "unit": "ms", "target": None, "note": "ms resolution"})


def run_compressed(base: Path, systems: Systems, quick: bool, results: dict[str, Any],
                   rows: list[dict[str, Any]], log: Any) -> None:
    size = 10 * MB if quick else 100 * MB
    reps = 2 if quick else 3
    storage = systems.trees["on"].storage
    res: dict[str, Any] = {}
    for kind, src in pristine(base, size, log).items():
        name = f"c.fits.{kind}"
        first, repeat, ap = [], [], []
        for _ in range(reps):
            shutil.copyfile(src, storage / name)
            first.append(_sp_edit(systems, name, "Pass"))
            repeat.append(_sp_edit(systems, name, "Fail"))
            shutil.copyfile(src, storage / f"a-{name}")
            ap.append(_astropy_edit(systems, storage / f"a-{name}", "Pass"))
        for leftover in (storage / name, storage / f"a-{name}"):
            leftover.unlink()
        single = _single_layout_edits(src, storage, name, reps)
        res[kind] = {"data_bytes": size, "compressed_bytes": os.path.getsize(src),
                     "first_s": first, "repeat_s": repeat, "astropy_s": ap,
                     "single_first_s": single[0], "single_repeat_s": single[1]}
        log(f"{kind} {_label(size)}: first {median(first):.2f} s, repeat"
            f" {median(repeat):.3f} s, astropy {median(ap):.2f} s")
        for what, xs, limit in (("first", first, 0.7), ("repeat", repeat, 0.05)):
            rows.append({"workload": f"4 .fits.{kind} {_label(size)} {what} edit",
                         "spoolops": median(xs), "baseline": median(ap),
                         "baseline_name": "astropy-update", "unit": "s",
                         "target": ("<=", limit)})
        for what, xs in (("first", single[0]), ("repeat", single[1])):
            rows.append({"workload": f"4 .fits.{kind} {_label(size)} {what} edit,"
                         " single stream", "spoolops": median(xs), "baseline": median(ap),
                         "baseline_name": "astropy-update", "unit": "s", "target": None})
    results["compressed"] = res


def _single_layout_edits(src: Path, storage: Path, name: str, reps: int
                         ) -> tuple[list[float], list[float]]:
    """The default ``compressed_layout = single`` (one stream, readable by
    cfitsio), timed in-process: the op's own time, no spool round trip."""
    from spoolops.fits import edit, parse_values
    work = storage.parent / "single-work"
    work.mkdir(mode=0o700, exist_ok=True)
    first, repeat = [], []
    for _ in range(reps):
        shutil.copyfile(src, storage / f"s-{name}")
        for qa, times in (("Pass", first), ("Fail", repeat)):
            t0 = time.perf_counter()
            edit.update_file(storage, f"s-{name}", parse_values({"qa_state": qa}),
                             work_dir=work, durable=True, layout="single")
            times.append(time.perf_counter() - t0)
    (storage / f"s-{name}").unlink()
    return first, repeat


def _hol_run(systems: Systems, pool: str, edit: Any, stop: Path, idle_n: int
             ) -> dict[str, Any]:
    """Client 1 echoes while client 0's edit runs; returns both.  The idle
    p99 comes from ``idle_n`` calls: from a few hundred it is the 2nd or 3rd
    worst, and the busy one (thousands of calls) the 30th or so."""
    p = systems.shared(pool)
    idle = p.run_one(1, {"cmd": "echo", "n": idle_n, "warmup": 5, "pad": 64})["lat"]
    if stop.exists():
        stop.unlink()
    edit_cmd = edit()
    p.send(0, edit_cmd)
    p.send(1, {"cmd": "echo", "n": 0, "until": str(stop), "pad": 64})
    edited = p.recv(0)
    stop.touch()
    busy = p.recv(1)["lat"]
    if not edited["ok"]:
        raise RuntimeError(f"{pool} edit failed: {edited['error']}")
    return {"idle_p99": percentile(idle, 99), "busy_p99": percentile(busy, 99),
            "busy_max": max(busy), "busy_calls": len(busy), "edit_s": edited["lat"]}


def run_hol(base: Path, systems: Systems, quick: bool, results: dict[str, Any],
            rows: list[dict[str, Any]], log: Any) -> None:
    size = 10 * MB if quick else 100 * MB
    reps = 2 if quick else 3
    idle_n = 300 if quick else 1500
    src = pristine(base, size, log)["bz2"]
    storage = systems.trees["on"].storage
    out: dict[str, list] = {"spoolops": [], "old-http": []}
    for rep in range(reps):
        shutil.copyfile(src, storage / "hol.fits.bz2")
        out["spoolops"].append(_hol_run(systems, "spoolops/on", lambda: {
            "cmd": "call", "op": "update_headers", "timeout": 1200,
            "args": {"filename": "hol.fits.bz2", "values": {"qa_state": "Pass"}}},
            base / "stop", idle_n))
        shutil.copyfile(src, storage / "hol-a.fits.bz2")
        out["old-http"].append(_hol_run(systems, "old-http", lambda: {
            "cmd": "call", "op": "astropy_update", "timeout": 1200,
            "args": {"path": str(storage / "hol-a.fits.bz2"), "values": QA["Pass"]}},
            base / "stop", idle_n))
        log(f"head-of-line repetition {rep + 1}/{reps} done")
    for leftover in (storage / "hol.fits.bz2", storage / "hol-a.fits.bz2"):
        leftover.unlink()
    summary = {k: {m: median([r[m] for r in runs]) for m in runs[0]} for k, runs in out.items()}
    results["hol"] = {"size": _label(size), "summary": summary, "runs": out}
    sp, http = summary["spoolops"], summary["old-http"]
    rows.append({"workload": f"2 echo p99 during {_label(size)} .bz2 edit vs idle",
                 "spoolops": 1e3 * sp["busy_p99"], "baseline": 1e3 * sp["idle_p99"],
                 "baseline_name": "spoolops idle", "unit": "ms", "target": ("<=", 3.0)})
    rows.append({"workload": "2 (old-http) echo p99 during the edit vs idle",
                 "spoolops": 1e3 * http["busy_p99"], "baseline": 1e3 * http["idle_p99"],
                 "baseline_name": "old-http idle", "unit": "ms", "target": None,
                 "note": f"blocked {http['edit_s']:.1f} s"})
