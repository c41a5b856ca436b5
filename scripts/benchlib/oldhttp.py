"""Baseline ``old-http``: a ``wsgiref.simple_server`` JSON endpoint on 127.0.0.1.

As FitsStorage's old ``api_backend.py``: one thread, one request at a time,
a new connection per call.  ``python -m benchlib.oldhttp`` prints the port,
then serves ``POST /`` with ``{"op": OP, "args": {...}}``: ``echo`` returns
the args; ``astropy_update`` edits a FITS header the FitsStorage way
(``benchlib.astropy_way``), blocking every other client meanwhile.

Trusts: its clients (it has no access control, like the system it stands for).
"""

from __future__ import annotations

import http.client
import json
import sys
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = json.loads(environ["wsgi.input"].read(length) or b"{}")
    op, args = body.get("op"), body.get("args", {})
    if op == "echo":
        out: dict[str, Any] = {"ok": True, "result": args}
    elif op == "astropy_update":
        from .astropy_way import edit
        out = {"ok": True, "result": {"seconds": edit(args["path"], args["values"])}}
    else:
        out = {"ok": False, "error": f"unknown op {op!r}"}
    data = json.dumps(out).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # the bench discards the access log anyway; skip the stderr write


def serve() -> None:
    import benchlib.astropy_way  # noqa: F401 - astropy loaded at start, as a server would
    server = make_server("127.0.0.1", 0, app, handler_class=QuietHandler)
    print(server.server_port, flush=True)
    server.serve_forever()


class HttpCaller:
    def __init__(self, url: str) -> None:
        host, port = url.rsplit(":", 1)
        self.host, self.port = host, int(port)

    def call(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("POST", "/", body=json.dumps({"op": op, "args": args}),
                         headers={"Content-Type": "application/json"})
            out = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        if not out.get("ok"):
            raise RuntimeError(out.get("error"))
        return out["result"]


if __name__ == "__main__":
    sys.exit(serve())
