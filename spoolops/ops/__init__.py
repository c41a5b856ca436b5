"""The operation registry: what the worker can do, and what each op declares.

An ``Operation`` declares its name, how to validate its arguments, whether it
is idempotent (an idempotent op cut off by a crash is simply run again), the
target file(s) it touches (requests with a common target run one at a time),
and who may call it by default (``[access]`` in the config overrides).  The
last two must be declared -- ``targets=NO_TARGETS`` and
``allowed_users=EVERYONE`` say so explicitly -- so that an op that forgets
them fails to register instead of silently running unserialised for the
whole group.  ``docs/writing-an-operation.rst`` shows a complete one.

Built-in ops live in this package, one module each; site operations come from
the ``spoolops.ops`` entry-point group: each entry point names either an
``Operation`` or a callable returning an iterable of them.

Trusts: the code it registers (site ops run as the worker user).  Arguments
reaching ``validate`` are untrusted JSON from a member of the submit group;
``run`` only ever sees what ``validate`` returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import ALL_USERS, Config
from ..errors import SpoolError
from ..workhome.memos import Memo
from .args import object_args

log = logging.getLogger("spoolops.ops")

ENTRY_POINT_GROUP = "spoolops.ops"
# (name, ctx) -> path below storage_root: the entry point named "filename"
# resolves a request's filename, any other one its data_label
RESOLVER_GROUP = "spoolops.resolvers"
HOOK_GROUP = "spoolops.hooks"            # (op, args, result, ctx) -> None, after a change

Hook = Callable[[str, dict[str, Any], dict[str, Any], "OpContext"], None]
Resolver = Callable[[str, "OpContext"], str]


@dataclass
class OpContext:
    """What an operation may know and use while it runs."""

    config: Config
    work_dir: Path                   # the worker's private dir: journals, locks
    request_id: str = ""
    user: str = ""                   # the submitter (from the request file's owner)
    progress: Callable[[int, int], None] = field(default=lambda done, total: None)
    log: logging.Logger = log
    # the site's resolvers (entry-point group spoolops.resolvers): "filename"
    # and "data_label" -> a path below storage_root; each only if installed
    resolvers: Mapping[str, Resolver] = field(default_factory=dict)
    # notes this request keeps for its own re-run after a crash
    memo: Memo = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.memo is None:
            self.memo = Memo(self.work_dir, self.request_id or "unnamed", self.config.durable)


def NO_TARGETS(args: Mapping[str, Any], ctx: OpContext) -> Sequence[str]:
    """``targets=NO_TARGETS``: the op writes no file (nothing to serialise)."""
    return ()


EVERYONE = (ALL_USERS,)          # allowed_users=EVERYONE: every member of the group


class _SiteDefault(tuple):
    """``allowed_users=SITE_DEFAULT``: whoever ``[access] default`` allows."""

    def __repr__(self) -> str:
        return "SITE_DEFAULT"


SITE_DEFAULT = _SiteDefault()


@dataclass(frozen=True)
class Operation:
    """One thing the worker can do on request.

    ``validate(args, ctx)`` returns the cleaned arguments or raises an
    ``OpError`` (usually ``BadRequest``) without touching any data file.
    ``targets(clean_args, ctx)`` returns the serialisation keys, normally the
    real paths of the files the op writes.  ``run(ctx, clean_args)`` returns
    the ``result`` dict of the reply or raises an ``OpError``; any other
    exception becomes ``OpFailed``.
    """

    name: str
    run: Callable[[OpContext, dict[str, Any]], dict[str, Any]]
    _: KW_ONLY
    # the serialisation keys (normally real paths of the files it writes), or
    # NO_TARGETS: required, so that no op runs unserialised by omission
    targets: Callable[[Mapping[str, Any], OpContext], Sequence[str]]
    # who may call it unless [access] says otherwise: names, EVERYONE, or
    # SITE_DEFAULT ([access] default): required, fail closed
    allowed_users: tuple[str, ...]
    validate: Callable[[Mapping[str, Any], OpContext], dict[str, Any]] = object_args
    idempotent: bool = False
    # called once at worker start, under the lock, before any request runs:
    # finish or undo what a crash cut off (e.g. roll back a journal); returns
    # one line per thing it did, for the log
    recover: Callable[[OpContext], Sequence[str]] | None = None
    # an op that does no I/O and returns at once (``echo``) may run on the
    # worker's dispatch thread instead of the pool: it can block nobody
    inline: bool = False
    # it changes stored data: the site's follow-up hooks (entry-point group
    # spoolops.hooks) run after each success, e.g. to queue a re-ingest
    follow_up: bool = False
    description: str = ""
    schema: Mapping[str, str] = field(default_factory=dict)  # arg -> human type, for docs

    @property
    def instant(self) -> bool:
        """Declared ``inline`` (no I/O, over in microseconds) and idempotent:
        it may run without a run record, on the dispatch thread, and (on an
        ``AnswersInPlace`` transport) before its claim."""
        return self.inline and self.idempotent


class Registry:
    """Operations by name; the site's follow-up hooks and resolvers."""

    def __init__(self, operations: Iterable[Operation] = ()) -> None:
        self._ops: dict[str, Operation] = {}
        self.hooks: list[tuple[str, Hook]] = []
        self.resolvers: dict[str, Resolver] = {}
        for op in operations:
            self.register(op)

    def register(self, op: Operation, replace: bool = False) -> None:
        if not isinstance(op, Operation):
            raise SpoolError(f"not an Operation: {op!r}")
        if not callable(op.targets) or not callable(op.run) or not callable(op.validate):
            raise SpoolError(f"operation {op.name!r}: run, validate and targets must be"
                             " callables (targets=NO_TARGETS if it writes no file)")
        if not isinstance(op.allowed_users, tuple) or not (
                op.allowed_users is SITE_DEFAULT or op.allowed_users) or \
                not all(isinstance(u, str) and u for u in op.allowed_users):
            raise SpoolError(f"operation {op.name!r}: allowed_users must be user names,"
                             " EVERYONE or SITE_DEFAULT")
        if op.name in self._ops and not replace:
            raise SpoolError(f"operation {op.name!r} is registered twice")
        self._ops[op.name] = op

    def get(self, name: str) -> Operation | None:
        return self._ops.get(name)

    def names(self) -> list[str]:
        return sorted(self._ops)

    def __contains__(self, name: object) -> bool:
        return name in self._ops

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Register site operations; returns the names added.  A broken entry
        point is logged and skipped: one site's bug must not stop the worker."""
        added = []
        for ep in metadata.entry_points(group=group):
            try:
                obj = ep.load()
                ops = [obj] if isinstance(obj, Operation) else list(obj())
                for op in ops:
                    self.register(op)
                    added.append(op.name)
            except Exception as exc:  # noqa: BLE001 - site code, report and go on
                log.error("event=entry_point_failed entry_point=%s error=%r", ep.name, exc)
        return added

    def load_hooks(self, group: str = HOOK_GROUP) -> list[str]:
        """Follow-up hooks, in the order of their entry-point names."""
        for ep in sorted(metadata.entry_points(group=group), key=lambda ep: ep.name):
            try:
                hook = ep.load()
                if not callable(hook):
                    raise SpoolError(f"{hook!r} is not callable")
                self.hooks.append((ep.name, hook))
            except Exception as exc:  # noqa: BLE001 - site code, report and go on
                log.error("event=entry_point_failed entry_point=%s error=%r", ep.name, exc)
        return [name for name, _hook in self.hooks]

    def load_resolvers(self, group: str = RESOLVER_GROUP) -> list[str]:
        """The site's resolvers: the entry point named ``filename`` maps a
        request's ``filename``, any other name (``data_label``, or an older
        site's own name) its ``data_label``.  Two for the same kind resolve
        neither (which one would be right?), said in the log."""
        found: dict[str, list[tuple[str, Resolver]]] = {}
        for ep in metadata.entry_points(group=group):
            try:
                resolver = ep.load()
                if not callable(resolver):
                    raise SpoolError(f"{resolver!r} is not callable")
            except Exception as exc:  # noqa: BLE001 - site code, report and go on
                log.error("event=entry_point_failed entry_point=%s error=%r", ep.name, exc)
                continue
            kind = "filename" if ep.name == "filename" else "data_label"
            found.setdefault(kind, []).append((ep.name, resolver))
        for kind, candidates in found.items():
            if len(candidates) > 1:
                log.error("event=resolvers_ambiguous kind=%s names=%s action=refused", kind,
                          ",".join(name for name, _r in candidates))
                continue
            self.resolvers[kind] = candidates[0][1]
        return sorted(self.resolvers)


def builtin_operations() -> list[Operation]:
    """The operations shipped with spoolops."""
    from .echo import ECHO
    from .headers import UPDATE_HEADERS
    from .ingest import INGEST_UPLOAD
    return [ECHO, UPDATE_HEADERS, INGEST_UPLOAD]


def default_registry(entry_points: bool = True) -> Registry:
    """Built-in operations plus, unless disabled, the site's entry points."""
    registry = Registry(builtin_operations())
    if entry_points:
        registry.load_entry_points()
        registry.load_hooks()
        registry.load_resolvers()
    return registry
