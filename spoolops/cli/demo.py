"""``spoolops demo``: the whole job on a throw-away local tree.

Builds a spool, a storage tree with sample FITS files and an upload staging
folder below one folder, starts a real worker process on it, sends real
requests through the real client (echo, header edits on a plain and a
bz2-compressed file, an upload ingest, two requests that must fail), prints
each reply and ``spoolops status``, and stops the worker with SIGTERM.
Runs as any user: the tree belongs to whoever runs it.

``--transport postgresql``: the same over a throwaway PostgreSQL cluster
(``pgcluster``; the machine's server binaries), the queue set up by the
same code as ``spoolops init --transport postgresql``, the worker and the
client connecting as two roles (``demo_worker``, ``demo_web``).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..admin import init_tree, resolve_accounts
from ..client import Client
from ..config import load_config
from ..errors import OpError
from ..transport import open_transport

CONFIG = """\
[spool]
root = spool
durable = yes
transport = {transport}
{postgresql}
[worker]
concurrency = 4
rescan_interval = 10s

[storage]
storage_root = storage
upload_staging_dir = staging
"""


def _sample_fits(path: Path, seed: int) -> None:
    import numpy as np
    from astropy.io import fits
    rng = np.random.default_rng(seed)
    hdu = fits.PrimaryHDU(rng.integers(0, 60000, size=(256, 256), dtype=np.uint16))
    hdu.header["OBJECT"] = ("NGC 1275", "demo target")
    hdu.header["INSTRUME"] = "GMOS-N"
    hdu.header["RAWGEMQA"] = "UNKNOWN"
    hdu.header["RAWPIREQ"] = "UNKNOWN"
    hdu.add_checksum()
    hdu.writeto(path)


def _configure(base: Path, transport: str) -> tuple[Path, Path, object]:
    """(worker config, client config, cluster or None)."""
    config_path, client_path = base / "spoolops.conf", base / "client.conf"
    if transport == "spool":
        config_path.write_text(CONFIG.format(transport="spool", postgresql=""))
        config = load_config(config_path)
        init_tree(config, resolve_accounts(config))
        return config_path, config_path, None
    from ..pgcluster import start_cluster
    print("starting a throwaway PostgreSQL cluster ...")
    cluster = start_cluster()   # its own folder: the server account must reach it
    try:
        cluster.psql("CREATE DATABASE demo")
        for path, role in ((config_path, "demo_worker"), (client_path, "demo_web")):
            path.write_text(CONFIG.format(transport="postgresql", postgresql=(
                f"\n[postgresql]\ndsn = {cluster.dsn('demo', role)}\n")))
        config = load_config(config_path)
        for line in init_tree(config, resolve_accounts(config),
                              admin_dsn=cluster.dsn("demo", "postgres"),
                              web_logins=["demo_web"], worker_logins=["demo_worker"]):
            print(f"  {line}")
    except BaseException:
        cluster.destroy()
        raise
    print(f"  cluster in {cluster.base}, queue in schema {config.schema}")
    return config_path, client_path, cluster


def run_demo(directory: str | None = None, keep: bool = False,
             transport: str = "spool") -> int:
    base = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="spoolops-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    config_path, client_path, cluster = _configure(base, transport)
    try:
        return _demo(base, config_path, client_path, directory, keep)
    finally:
        if cluster is not None:
            from ..transport.pg.conn import shutdown
            shutdown()
            cluster.destroy()


def _demo(base: Path, config_path: Path, client_path: Path, directory: str | None,
          keep: bool) -> int:
    config = load_config(config_path)
    night = config.storage_root / "20261128"
    night.mkdir(exist_ok=True)
    _sample_fits(night / "N20261128S0001.fits", 1)
    _sample_fits(night / "N20261128S0002.fits", 2)
    raw = (night / "N20261128S0002.fits").read_bytes()
    (night / "N20261128S0002.fits.bz2").write_bytes(bz2.compress(raw))
    (night / "N20261128S0002.fits").unlink()
    _sample_fits(config.upload_staging_dir / "N20261128S0003.fits", 3)
    upload_md5 = hashlib.md5((config.upload_staging_dir / "N20261128S0003.fits").read_bytes(),
                             usedforsecurity=False).hexdigest()
    print(f"demo tree: {base}")
    print(f"  spool   {config.root}\n  storage {config.storage_root}\n"
          f"  staging {config.upload_staging_dir}")

    log_path = base / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "spoolops", "--config",
                                   str(config_path), "worker"], stdout=log, stderr=log,
                                  stdin=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        transport = open_transport(config)
        while transport.worker_alive() != (True, worker.pid):
            if worker.poll() is not None or time.monotonic() > end:
                print("the worker did not start; its log:", file=sys.stderr)
                print(log_path.read_text(), file=sys.stderr)
                return 1
            time.sleep(0.05)
        print(f"worker running, pid {worker.pid}")
        client = Client(config=client_path)
        requests = [
            ("echo", {"hello": "world"}),
            ("update_headers", {"filename": "20261128/N20261128S0001.fits",
                                "values": {"qa_state": "Pass", "raw_site": "iq70",
                                           "release": "2027-05-28",
                                           "generic": {"OBSERVER": "demo"}}}),
            ("update_headers", {"filename": "20261128/N20261128S0002.fits.bz2",
                                "values": {"qa_state": "Usable"}}),
            ("ingest_upload", {"filename": "N20261128S0003.fits", "path": "20261128",
                               "md5": upload_md5}),
            ("update_headers", {"filename": "20261128/N20261128S0001.fits",
                                "values": {"generic": {"NAXIS": 3}}}),
            ("no_such_op", {}),
        ]
        failures = 0
        for op, args in requests:
            print(f"\n--- spoolops call {op}  args={json.dumps(args)}")
            started = time.perf_counter()
            try:
                result = client.call(op, args, timeout=120)
                print(f"ok in {1000 * (time.perf_counter() - started):.1f} ms, result:")
                print(json.dumps(result, indent=2))
            except OpError as exc:
                failures += 1
                print(f"failed as expected in {1000 * (time.perf_counter() - started):.1f} ms:"
                      f" {exc.type}: {exc.message}")
        from astropy.io import fits
        header = fits.getheader(night / "N20261128S0001.fits")
        print("\n--- header of 20261128/N20261128S0001.fits after the edit")
        for key in ("RAWGEMQA", "RAWPIREQ", "RAWIQ", "RELEASE", "OBSERVER", "CHECKSUM"):
            print(f"{key:8} = {header.get(key)!r}")
        print("\n--- spoolops status")
        status = subprocess.run([sys.executable, "-m", "spoolops", "--config", str(config_path),
                                 "status"], capture_output=True, text=True, check=False)
        print(status.stdout, end="")
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
    print(f"\nworker stopped cleanly (exit {code}); its log:")
    print(log_path.read_text(), end="")
    ok = code == 0 and failures == 2
    if directory is None and not keep:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"\nthe tree is kept in {base}")
    print("\ndemo " + ("finished: all replies as expected" if ok else "FAILED"))
    return 0 if ok else 1
