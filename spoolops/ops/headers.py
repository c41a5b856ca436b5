"""``update_headers``: edit FITS header cards of a file in the archive.

Trusts: the configuration (``storage_root``) and the worker's ``work/``.
Distrusts: every argument (JSON from a member of the submit group).
``validate`` does all that can fail without reading the file: argument
types, keyword and value rules, the value mappings, confinement of
``filename`` below ``storage_root`` (``NotFound`` if it is missing).  ``run``
then reads the header; the hdu range, ``reject_new`` and ``before_md5`` are
checked before any byte is written.  Idempotent: running a request twice
leaves the same header (the second run reports ``modified: false``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import confine
from ..errors import BadRequest
from ..fits import parse_values, recover_journals, update_file
from ..fits.compress import kind_of
from . import SITE_DEFAULT, OpContext, Operation
from . import args as check

_ARGS = ("filename", "values", "reject_new", "before_md5", "hdu", "md5")


def validate_update_headers(args: Any, ctx: OpContext) -> dict[str, Any]:
    args = check.object_args(args)
    check.only(args, _ARGS, "update_headers")
    filename = "/".join(check.relative_path(args, "filename"))
    if kind_of(filename) == "?":
        raise BadRequest("filename must end in .fits, .fits.gz or .fits.bz2")
    edits = parse_values(args.get("values"))
    clean = {"filename": filename, "edits": [list(e) for e in edits],
             "hdu": check.integer(args, "hdu", 0, minimum=0),
             "reject_new": check.flag(args, "reject_new"), "md5": check.flag(args, "md5"),
             "before_md5": check.md5(args, "before_md5")}
    confine.resolve_target(ctx.config.storage_root, filename)   # NotFound / BadRequest
    return clean


def targets_update_headers(args: Mapping[str, Any], ctx: OpContext) -> Sequence[str]:
    return [confine.resolve_target(ctx.config.storage_root, args["filename"])]


def run_update_headers(ctx: OpContext, args: dict[str, Any]) -> dict[str, Any]:
    return update_file(ctx.config.storage_root, args["filename"],
                       [(k, v) for k, v in args["edits"]], work_dir=ctx.work_dir,
                       durable=ctx.config.durable, reject_new=args["reject_new"],
                       before_md5=args["before_md5"], hdu=args["hdu"],
                       want_md5=args["md5"], token=ctx.request_id[-24:],
                       progress=ctx.progress, layout=ctx.config.compressed_layout)


def recover_update_headers(ctx: OpContext) -> Sequence[str]:
    """Roll back in-place header edits a crash cut off (run at worker start)."""
    return recover_journals(ctx.work_dir)


UPDATE_HEADERS = Operation(
    name="update_headers",
    run=run_update_headers,
    recover=recover_update_headers,
    validate=validate_update_headers,
    targets=targets_update_headers,
    allowed_users=SITE_DEFAULT,
    idempotent=True,
    description="Set or delete FITS header keywords of a stored file, atomically.",
    schema={"filename": "path below storage_root (.fits, .fits.gz, .fits.bz2)",
            "values": "{qa_state, raw_site, release, generic: {KEYWORD: value|null}}",
            "reject_new": "bool (default false)", "before_md5": "32 hex digits",
            "hdu": "int >= 0 (default 0)", "md5": "bool: compute md5s on the in-place path"},
)
