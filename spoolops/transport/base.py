"""The transport interface: every state change in the life of a request.

A request is *published* by a client, *claimed* by the worker (or
*withdrawn* by its client first), *started* (a run record says who runs it
since when, and its *progress*), then *answered*: the reply is recorded,
the request retired and the reply published as one step, so that every
request gets exactly one reply.  A request that cannot run safely is
*quarantined* (kept aside with a reason); one cut off by a crash is found
again as an *orphan* and re-run, put back, or *failed* with an
``Interrupted`` reply.  The client *collects* its reply -- trusting only one
the worker wrote -- and the janitor *reaps* what is stale.

``spool.SpoolTransport`` (the filesystem spool, the default) is one
implementation; ``pg.PgTransport`` (a PostgreSQL table, for workers and
clients on different hosts) the other.  Worker, recovery, janitor,
admin, status and the CLI hold policy and call only this interface; dispatch
and the operations know no transport at all.  Implementations own their
names, paths and formats at rest, and decide what they trust.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..config import Config

# the states a request passes through, as status reports them
STATES = ("queued", "running", "failed", "replies")
# the words 'spoolops ls' takes for them (the spool's folder names, which
# operators know from 'ls')
STATE_WORDS = {"new": "queued", "active": "running", "failed": "failed", "replies": "replies"}


@dataclass(frozen=True, slots=True)
class Batch:
    """What keeps a request's batch pending until the request is wholly done
    (FitsStorage's reducer holds a reduction back while a file operation of
    its ``after_batch`` is pending): ``marker``, the client's mark of the
    request where a transport needs one (the spool: ``pending/<marker>``);
    ``name``, the request's batch (its ``args["batch"]``, if any); ``held``,
    whether it stays pending after the answer (follow-up hooks to retry,
    until ``release_batch``)."""

    marker: str | None
    name: str | None
    held: bool = False


@dataclass(frozen=True, slots=True)
class Claimed:
    """A request taken from the queue: its id, sender and bytes.

    ``user`` is the submitter as the transport knows it (the owner of a
    request file, the database role that inserted a row), never a field of
    the request; ``queued_ns`` its place in line (submission time, a future
    one counted as now)."""

    entry: str
    rid: str
    data: bytes
    user: str
    queued_ns: int


@dataclass(frozen=True, slots=True)
class Refused:
    """A claimed request whose id and sender are known but whose bytes cannot
    be used (too large, unreadable): it is answered ``BadRequest: problem``."""

    entry: str
    rid: str
    user: str
    queued_ns: int
    problem: str


@dataclass(frozen=True, slots=True)
class Quarantined:
    """An entry that is not a request anybody can be answered about: kept
    aside (or, when it cannot be moved, left and skipped) with ``reason``."""

    entry: str
    reason: str
    moved: bool = True


@dataclass(frozen=True, slots=True)
class Orphan:
    """A request claimed by a worker that is gone."""

    entry: str
    rid: str | None          # None: its entry carries no request id
    started: bool            # its run record exists: it may have done something
    where: str = ""          # where an operator finds it (a path, a row)
    # claimed by a worker of this host (its on-disk state, e.g. a journal,
    # is here): only then may this worker re-run or interrupt it when its op
    # keeps such state (``Operation.recover``)
    local: bool = True
    # its worker was taken over (``settle`` fenced it): recovery may take it
    # now; otherwise it is reported, and taken after the next ``settle``
    settled: bool = True


@dataclass
class Step:
    """One thing done to the queue's state (or, in a dry run, to be done):
    a removal by the janitor, a step of recovery or of ``settle``."""

    action: str              # remove, publish, fence, requeue, interrupt, ...
    path: str                # what it was done to, as an operator finds it
    why: str
    age_s: float | None = None
    done: bool = False
    error: str | None = None


@dataclass
class Finding:
    """Something the janitor reports and leaves alone."""

    kind: str                # stuck, orphan, running_long, unpublished, skipped
    path: str
    why: str
    age_s: float | None = None


@dataclass(frozen=True)
class Ages:
    """How long things may stay before the janitor removes or reports them."""

    tmp_ttl: float
    reply_ttl: float
    failed_ttl: float
    stuck_after: float
    lock_ttl: float


@dataclass
class StateCount:
    count: int | None        # None: see ``problem``
    oldest_age_s: float | None = None
    where: str = ""          # where the state is kept, for messages ("new/")
    problem: str | None = None   # "missing", or "unreadable" by this reader


@dataclass
class Entry:
    """One entry of one state, for ``spoolops ls``."""

    state: str               # queued, running, failed, replies
    name: str
    id: str | None
    mtime: float
    fields: dict[str, Any] = field(default_factory=dict)


class Waiter(ABC):
    """A client waiting for one reply (registered before its request is published)."""

    @abstractmethod
    def wait(self, timeout: float) -> None:
        """Return when the reply may have come, or ``timeout`` passed."""

    @abstractmethod
    def close(self) -> None:
        """Stop waiting."""


class WorkerLock(ABC):
    """The one-worker-per-spool lock, held for the worker's life."""

    @abstractmethod
    def release(self) -> None: ...


class ClientSide(ABC):
    """What a client needs of a transport: queue a request, withdraw it
    while it waits, wait for and read its reply (``Client`` holds only
    this side)."""

    @abstractmethod
    def check_exists(self) -> None:
        """Raise ``SpoolSetupError`` (naming the fix) if there is no spool."""

    @abstractmethod
    def publish(self, request: dict[str, Any]) -> str:
        """Queue ``request``; its id once it is queued (and, if durable, kept).
        Raises and queues nothing otherwise."""

    @abstractmethod
    def withdraw(self, rid: str, answer: dict[str, Any] | None = None) -> bool:
        """Cancel: True if the request was still queued (it then never runs).
        ``answer``: also reply with it (an operator's cancel wakes the client;
        only when ``may_answer``)."""

    @abstractmethod
    def pending_batches(self) -> set[str]:
        """The batches of requests queued or running, or answered with
        follow-up hooks still to retry -- true whether or not a worker runs.
        Any member of the submit group may ask (FitsStorage's reducer)."""

    @abstractmethod
    def queue_length(self) -> int:
        """How many requests are queued or running (any submitter's)."""

    @abstractmethod
    def expect(self, rid: str) -> Waiter:
        """Start waiting for ``rid``'s reply (before publishing it, so that no
        reply is missed)."""

    @abstractmethod
    def collect(self, rid: str, remove: bool = True, submitter: str | None = None,
                op: str | None = None) -> dict[str, Any] | None:
        """The reply to ``rid`` if one the worker wrote is there (owner and id
        checked; and, when given, that it answers ``submitter``'s request for
        ``op``: a client accepts only its own answer); removed once read when
        ``remove``.  None if not (yet)."""

    @abstractmethod
    def progress_of(self, rid: str) -> dict[str, Any] | None:
        """The progress a running request last reported, if any."""

    @abstractmethod
    def submitter_name(self) -> str:
        """Who this process submits as, the way a reply names its submitter
        (``submitted_by``): the client accepts only its own replies."""


class WorkerSide(ABC):
    """What the worker needs: the lock, the intake, claims and leases, the
    run record, the one reply, quarantine, recovery of what a dead worker
    left, liveness and counters."""

    durable: bool
    # the worker's private folder on its own host: target locks, journals,
    # records of temporary files (``OpContext.work_dir``)
    work_dir: Path
    # a scan returns at most this many entries (the best first); None: all
    scan_limit: int | None = None

    @abstractmethod
    def worker_uid(self) -> int:
        """The account the worker runs as: the only author of trusted replies."""

    @abstractmethod
    def check_worker(self) -> list[str]:
        """Before serving: raise ``SpoolSetupError`` if this process could not
        serve (requests or replies would be unreadable); warnings otherwise."""

    @abstractmethod
    def may_answer(self) -> bool:
        """Whether this process writes replies that clients trust (it runs
        as the worker's identity)."""

    @abstractmethod
    def lock_worker(self, wait: bool, should_stop: Callable[[], bool]) -> WorkerLock:
        """Become the one worker (``WorkerRunning`` if another is; ``wait``:
        as a standby, until it is gone)."""

    @abstractmethod
    def watch(self) -> int:
        """Start watching for new requests; a descriptor that is readable when
        some may have arrived (a hint: ``scan`` is the truth).  It lasts as
        long as the worker lock: releasing that stops the watch."""

    @abstractmethod
    def arrivals(self) -> list[str] | None:
        """Entries that may have arrived since the last call; None when the
        hints were lost and a full ``scan`` is needed."""

    @abstractmethod
    def scan(self) -> list[str]:
        """Every queued entry worth a look (the truth; slow)."""

    @abstractmethod
    def peek(self, entry: str) -> Claimed | None:
        """Read a queued entry without claiming it (to learn its place in
        line); None if it is gone or cannot be read."""

    @abstractmethod
    def claim(self, entry: str) -> Claimed | Refused | Quarantined | None:
        """Take a queued entry for running; None if it is gone (cancelled or
        taken).  Never replaces a running request of the same id."""

    def claim_all(self, entries: list[str]) -> list[Claimed | Refused | Quarantined | None]:
        """``claim`` for several entries, in order (a transport may do it in
        one step)."""
        return [self.claim(entry) for entry in entries]

    @abstractmethod
    def put_back(self, rid: str, targets: tuple[str, ...] | None = None) -> None:
        """Return a claimed, not started request to its place in line;
        ``targets``, when known, stay with it (a ``SharedQueue`` keeps a
        later request on one of them from starting first)."""

    @abstractmethod
    def start(self, rid: str, record: dict[str, Any], durable: bool) -> None:
        """Record that ``rid`` starts (who runs it, since when)."""

    @abstractmethod
    def progress(self, rid: str, record: dict[str, Any]) -> None:
        """Replace the run record with one carrying progress."""

    @abstractmethod
    def reply(self, rid: str, reply: dict[str, Any], started: bool = True, *,
              deliver: bool = True, batch: Batch | None = None) -> None:
        """Answer: record the reply, retire the request (and its run record),
        publish the reply -- one step, exactly once even across a crash.
        ``deliver=False`` (the request said ``"reply": false``): retire it and
        keep no reply.  ``batch``: the request's batch stops being pending
        now, or, when ``held``, stays pending until ``release_batch``.
        Raises ``OSError`` when it could not (the caller retries later)."""

    @abstractmethod
    def release_batch(self, rid: str, batch: Batch) -> None:
        """A held batch is no longer pending: the request's kept hook calls
        succeeded (or an operator dropped them)."""

    @abstractmethod
    def quarantine(self, entry: str, reason: str, claimed: bool) -> Quarantined:
        """Keep an entry aside with ``reason``; ``claimed``: it was claimed
        (else it is taken straight from the queue, never touching what runs)."""

    @abstractmethod
    def fail(self, rid: str, reply: dict[str, Any], reason: str) -> None:
        """Answer a claimed request and keep it aside with ``reason`` (an
        ``Interrupted`` orphan: requeue it by hand once checked)."""

    @abstractmethod
    def where(self, rid: str) -> str | None:
        """queued, running or failed: where the request itself is, if anywhere."""

    @abstractmethod
    def orphans(self) -> list[Orphan]:
        """Requests claimed by a worker that is gone."""

    @abstractmethod
    def read_claimed(self, entry: str) -> Claimed | None:
        """The bytes of a claimed (orphaned) request; None if unreadable."""

    @abstractmethod
    def settle(self, interrupted: Callable[[str], dict[str, Any]], dry_run: bool = False
               ) -> list[Step]:
        """Before orphans are looked at, under the worker lock: finish or drop,
        by itself, what a worker that is gone left half-done in this
        transport's own keeping (the spool: a reply written but not
        published, a request half moved aside, scratch files; PostgreSQL:
        the registration of a worker that is gone, fenced so that it can
        never answer late).  Never decides a request's fate: ``orphans``
        are recovery's policy.  ``interrupted(rid)``: the reply to give a
        request whose outcome was lost with its worker.  ``dry_run``: what
        it would do, doing nothing."""

    @abstractmethod
    def recovery_pending(self) -> bool:
        """Whether a dead worker left anything for recovery to do."""

    @abstractmethod
    def save_stats(self, snapshot: dict[str, Any]) -> bool:
        """Keep the worker's counters where ``load_stats`` finds them."""


class SharedQueue(ABC):
    """A transport several workers (hosts) may serve at once (PostgreSQL).
    Each leases its targets against the others, proves by a heartbeat that
    its loop turns (the others judge it), recovers now and then the orphans
    of workers that died elsewhere (``recovery.recover_orphans``) and its
    own strays, and operators see who serves.  The spool -- one worker by
    design, its lock the judge -- is not one of these."""

    # how often the worker's main loop must call ``heartbeat`` (seconds);
    # None while this process serves no queue (it holds no registration)
    heartbeat_interval: float | None

    @abstractmethod
    def lease(self, rid: str, targets: tuple[str, ...]) -> bool:
        """Reserve ``targets`` for claimed ``rid`` against other workers;
        False if one is in use elsewhere.  The reply (or ``put_back``,
        ``fail``) releases them."""

    @abstractmethod
    def heartbeat(self) -> bool:
        """The worker's main loop is alive; False when the worker was fenced
        (another took its requests over) and must stop at once."""

    @abstractmethod
    def strays(self, known: set[str], unstarted: set[str] | frozenset[str] = frozenset()
               ) -> list[Orphan]:
        """Requests the queue says this worker holds but that are not in
        ``known`` (what it is claiming, running or answering): a claim whose
        answer was lost, a ``put_back`` that failed.  Recovered like this
        host's orphans, by the worker itself; those in ``unstarted`` as never
        started (whose ``start`` failed, its answer maybe lost)."""

    @abstractmethod
    def workers(self) -> list[dict[str, Any]] | None:
        """Each registered worker: id, host, pid, whether it is alive, its
        heartbeat's age, the requests and targets it holds.  None when this
        reader may not look."""


class AnswersInPlace(ABC):
    """A transport that can claim and answer a queued request in one step,
    where a claim costs a round trip of its own (PostgreSQL: one UPDATE
    instead of a claim's and an answer's).  Only for an op declared instant
    and idempotent (``echo``) with no targets, no batch and a reply wanted:
    running it changes nothing, so it may run before its claim -- the one
    step answers it only if it is still queued exactly as read, and
    otherwise changes nothing.  The spool, whose claim is one rename, is not
    one of these."""

    @abstractmethod
    def read_ahead(self, entry: str) -> Claimed | None:
        """The queued request as this process already read it (its arrival's
        notice, the last scan), without I/O; None when it holds no read."""

    @abstractmethod
    def answer_queued(self, answers: Sequence[tuple[Claimed, dict[str, Any]]]) -> set[str]:
        """Claim and answer each read (from ``read_ahead``) with its reply,
        all in one durable step (one commit for the lot: a backlog is
        answered a batch at a time).  Returns the entries answered; for any
        other, nothing changed: it is no longer queued as read (withdrawn,
        claimed elsewhere, its read forgotten) -- the caller claims it the
        usual way, which finds out what became of it."""


class OperatorSide(ABC):
    """What operators' tools need (``spoolops init``, ``doctor``, ``status``,
    ``ls``, ``show``, ``tail``, ``requeue``, ``cancel``, the janitor): how
    the transport names itself and its places, what it checks, its views,
    its care."""

    # web users reach it through folders of the submit group (the spool):
    # doctor checks the group's members and the host's inotify limits;
    # otherwise through the transport's own identities (``diagnose``)
    submit_group_folders: ClassVar[bool] = False
    # the keywords ``create`` takes (``spoolops init``'s options for it)
    create_options: ClassVar[frozenset[str]] = frozenset()
    # the heading of the column that says where each state lives
    place_heading: ClassVar[str] = "where"

    @classmethod
    @abstractmethod
    def from_config(cls, config: Config) -> Transport:
        """The transport ``config`` describes."""

    @classmethod
    @abstractmethod
    def ready_line(cls, config: Config, worker_user: str, group: str) -> str:
        """What ``spoolops init`` says once the transport is set up."""

    @abstractmethod
    def title(self) -> str:
        """How ``spoolops status`` names this queue."""

    @abstractmethod
    def place_of(self, state: str) -> str:
        """Where a state word (``STATES``) lives, as an operator would look."""

    @abstractmethod
    def submit_gid(self) -> int:
        """The group whose members may submit."""

    @abstractmethod
    def layout(self) -> list[tuple[str, Path, tuple[int, ...]]]:
        """(label, folder, allowed modes) of what ``create`` makes, for
        ``spoolops doctor`` to check."""

    @abstractmethod
    def create(self, uid: int, gid: int, **options: Any) -> list[str]:
        """Create or repair the spool for worker ``uid`` and submit group
        ``gid`` (``spoolops init``; ``options`` are the transport's own);
        one line per change."""

    @abstractmethod
    def diagnose(self) -> list[tuple[str, bool, str, str]]:
        """(check, ok, message, fix) the transport can tell about itself for
        ``spoolops doctor``, beyond folders and accounts (the spool: the
        host's inotify limits; PostgreSQL: schema, roles, row-level security,
        the workers)."""

    @abstractmethod
    def requeue(self, rid: str) -> str:
        """Put a failed (or, with no worker, an orphaned) request back in
        line; where it came from.  ``SpoolSetupError`` when it cannot."""

    @abstractmethod
    def reap(self, now: float, ages: Ages, worker_alive: bool, dry_run: bool
             ) -> tuple[list[Step], list[Finding]]:
        """The janitor's removals by age, and what it must report."""

    @abstractmethod
    def worker_alive(self) -> tuple[bool | None, int | None]:
        """(alive, pid) of the worker; alive None when this reader cannot tell."""

    @abstractmethod
    def load_stats(self, fresh: bool = False) -> dict[str, Any] | None:
        """The worker's counters; ``fresh``: asked of the running worker now."""

    @abstractmethod
    def counts(self, now: float) -> dict[str, StateCount]:
        """Per state (queued, running, failed, replies): count and oldest age."""

    @abstractmethod
    def entries(self, state: str) -> list[Entry]:
        """One state's entries, oldest first (``PermissionError`` if not listable)."""

    @abstractmethod
    def find(self, prefix: str) -> list[str]:
        """Ids (or names of failed entries) starting with ``prefix``."""

    @abstractmethod
    def describe(self, rid: str) -> dict[str, Any] | None:
        """Where ``rid`` is and what it says: request, run record, reply, reason."""

    @abstractmethod
    def follow(self, should_stop: Callable[[], bool]) -> Iterator[dict[str, Any]]:
        """Events as they happen: queued, started, finished, failed, removed."""


class Transport(ClientSide, WorkerSide, OperatorSide):
    """One spool (or queue): the three sides a transport implements."""
