"""``update_headers``: edit FITS header cards of a file in the archive.

Two request shapes are accepted: ours, with the edits nested in ``values``,
and FitsStorage's, whose web code copies the ``values`` keys into the
arguments themselves (``{"filename": ..., "qa_state": "Pass", ...}``);
never both in one request.  The file is named by ``filename`` (relative to
``storage_root``; a name without ``.bz2``/``.gz`` finds the one stored file
it names, compressed or not -- or, where the site installs a ``filename``
resolver (entry-point group ``spoolops.resolvers``), whatever path under
``storage_root`` it maps the name to, as FitsStorage finds a file through
its database) or by ``data_label``, which the site's ``data_label``
resolver maps to a path.  ``batch`` is
passed on, untouched, to the follow-up hooks.

Trusts: the configuration (``storage_root``), the worker's ``work/`` and
the site's resolver.  Distrusts: every argument (JSON from a member of the
submit group).  ``validate`` does all that can fail without reading the
file: argument types, keyword and value rules, the value mappings,
confinement below ``storage_root`` (``NotFound`` if missing).  ``run`` then
reads the header; the hdu range, ``reject_new`` and ``before_md5`` are
checked before any byte is written.  Idempotent: running a request twice
leaves the same header (the second run reports ``modified: false``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import confine
from ..errors import BadRequest, Conflict, NotFound, OpError, OpFailed
from ..fits import parse_values, recover_journals, update_file
from ..fits.cards import BLANK, VALUE_KEYS, generic_pairs
from ..fits.compress import kind_of
from . import SITE_DEFAULT, OpContext, Operation
from . import args as check

_ARGS = ("filename", "data_label", "values", "reject_new", "before_md5", "hdu", "md5",
         "batch", *VALUE_KEYS)


def validate_update_headers(args: Any, ctx: OpContext) -> dict[str, Any]:
    args = check.object_args(args)
    check.only(args, _ARGS, "update_headers")
    flat = {key: args[key] for key in VALUE_KEYS if key in args}
    if flat and "values" in args:
        raise BadRequest("give the values either nested in 'values' or as arguments of"
                         f" their own, not both (found {', '.join(sorted(flat))} and values)")
    # FitsStorage's flat shape gets FitsStorage's meanings (parse_values), and
    # its reject_new guards only the generic keywords, as their fileops does
    edits = parse_values(args.get("values") if not flat else flat, fitsstorage=bool(flat))
    reject_new: bool | list[str] = check.flag(args, "reject_new")
    if reject_new and flat:
        reject_new = [kw for kw, _v in _generic_keywords(flat)]
    clean = {"filename": _stored_name(args, ctx),
             "edits": [[kw, None if value is BLANK else value] for kw, value in edits],
             "blank": [kw for kw, value in edits if value is BLANK],
             "hdu": check.integer(args, "hdu", 0, minimum=0),
             "reject_new": reject_new, "md5": check.flag(args, "md5"),
             "before_md5": check.md5(args, "before_md5")}
    if "batch" in args:
        clean["batch"] = args["batch"]
    if "data_label" in args:
        clean["data_label"] = args["data_label"]
    return clean


def _generic_keywords(values: dict[str, Any]) -> list[tuple[str, Any]]:
    generic = values.get("generic")
    return generic_pairs(generic) if generic is not None else []


def _stored_name(args: dict[str, Any], ctx: OpContext) -> str:
    """The stored file the request names, relative to storage_root: through
    the site's resolver for its kind of name when one is installed (a
    ``filename`` resolver finds files in any folder, as the archive's own
    database does), else ``filename`` as a path below storage_root."""
    if ("filename" in args) == ("data_label" in args):
        raise BadRequest("give filename or data_label (one of them)")
    kind = "data_label" if "data_label" in args else "filename"
    resolver = ctx.resolvers.get(kind)
    if kind == "data_label" or resolver is not None:
        given = check.text(args, kind)
        if not given:
            raise BadRequest(f"{kind} must be a non-empty string")
        if resolver is None:
            raise BadRequest("data_label cannot be resolved here: no resolver is installed"
                             " (entry-point group spoolops.resolvers); give filename")
        try:
            name = resolver(given, ctx)
        except OpError:
            raise
        except Exception as exc:  # noqa: BLE001 - site code: fail the request, say why
            raise OpFailed(f"the {kind} resolver failed: {type(exc).__name__}: {exc}"
                           ) from None
        if not isinstance(name, str) or not name:
            raise NotFound(f"no stored file has {kind} {given!r}")
        what = f"the file of {kind} {given!r}"
    else:
        name = "/".join(check.relative_path(args, "filename"))
        what = "filename"
    confine.split_relative(name, what)
    kind = kind_of(name)
    if kind == "?":
        raise BadRequest(f"{what} must end in .fits, .fits.gz or .fits.bz2")
    if kind:
        confine.resolve_target(ctx.config.storage_root, name)   # NotFound / BadRequest
        return name
    # a name without .bz2/.gz: the archive stores some files compressed
    found = []
    for candidate in (name, name + ".bz2", name + ".gz"):
        try:
            confine.resolve_target(ctx.config.storage_root, candidate)
            found.append(candidate)
        except NotFound:
            continue
    if not found:
        raise NotFound(f"{what} not found: {name} (nor {name}.bz2, {name}.gz)")
    if len(found) > 1:
        raise Conflict(f"{what} {name} could be any of {', '.join(found)}: name the one")
    return found[0]


def targets_update_headers(args: Mapping[str, Any], ctx: OpContext) -> Sequence[str]:
    return [confine.resolve_target(ctx.config.storage_root, args["filename"])]


def run_update_headers(ctx: OpContext, args: dict[str, Any]) -> dict[str, Any]:
    blank = set(args.get("blank", ()))
    return update_file(ctx.config.storage_root, args["filename"],
                       [(k, BLANK if k in blank else v) for k, v in args["edits"]],
                       work_dir=ctx.work_dir,
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
    follow_up=True,
    description="Set or delete FITS header keywords of a stored file, atomically.",
    schema={"filename": "path below storage_root (.fits, .fits.gz, .fits.bz2; without"
                        " .bz2/.gz: the one stored)",
            "data_label": "instead of filename: resolved by the site's resolver",
            "values": "{qa_state, raw_site, release, generic: {KEYWORD: value|null} or"
                      " [[KEYWORD, value], ...]} -- or these keys as arguments of their own",
            "batch": "any: passed on to the follow-up hooks",
            "reject_new": "bool (default false)", "before_md5": "32 hex digits",
            "hdu": "int >= 0 (default 0)", "md5": "bool: compute md5s on the in-place path"},
)
