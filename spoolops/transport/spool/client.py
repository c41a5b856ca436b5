"""The client's half of the spool: publish, withdraw, wait for and collect replies.

``publish`` holds the one rename that puts a request in the queue.  Trusts
nothing found in ``replies/`` (group-writable): a reply counts only if it is
a plain file owned by the worker user whose ``id`` matches.  A mixin of
``SpoolTransport`` (its folders and names); the waiting itself is
``spool.watch``'s (one inotify instance per process).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from ...errors import BadRequest, SpoolSetupError
from ...files import (
    UnsafeEntry,
    create_file,
    discard_new_file,
    fsync_dir,
    read_untrusted,
    remove_quietly,
    write_all,
)
from ...formats import batch_name, encode_json, valid_id
from ...users import user_name
from ..base import Waiter
from .names import (
    HELD_SUFFIX,
    MAX_REPLY_BYTES,
    MAX_RUN_RECORD_BYTES,
    REQUEST_SUFFIX,
    RUN_SUFFIX,
    WITHDRAWN_SUFFIX,
    batch_of_marker,
    marker_name,
    valid_marker,
)
from .watch import shared_watcher

log = logging.getLogger("spoolops.transport")


class SpoolClientSide:
    """Publishing and collecting (mixed into ``SpoolTransport``)."""

    root: Path
    replies: Path
    durable: bool
    max_request_bytes: int
    _new: str
    _tmp: str
    _active: str
    _replies: str
    _pending: str

    def publish(self, request: dict[str, Any]) -> str:
        """Write ``tmp/ID.json`` and rename it into ``new/``: the one rename
        that publishes a request.  Returns the id once the request is queued
        (and, with ``durable``, on disk); raises if nothing was queued.

        Durable without reading ``new/`` (mode 2730: members may not open it
        to fsync it): the file is fsynced before the rename (its bytes), and
        again after it.  A rename changes the renamed inode (its ctime), so
        on ext4 and xfs that second fsync commits the journal transaction
        that holds the rename itself.
        """
        rid = request["id"]
        if not valid_id(rid):
            raise BadRequest(f"invalid request id {rid!r}")
        try:
            marker = marker_name(batch_name(request.get("args")))
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"the request's batch cannot be marked: {exc}") from None
        request = {**request, "marker": marker}
        try:
            data = encode_json(request)
        except (ValueError, TypeError) as exc:   # NaN, a set, an object...
            raise BadRequest(f"the request cannot be written as JSON: {exc}") from None
        if len(data) > self.max_request_bytes:
            raise BadRequest(f"request is {len(data)} bytes, more than max_request_bytes"
                             f" ({self.max_request_bytes})")
        # marked pending before it is queued: a batch is never seen done while
        # its request waits (the mark's entry is committed with the request's
        # own fsyncs below: ext4 and xfs journal metadata in order)
        mark = f"{self._pending}/{marker}"
        try:
            os.close(create_file(mark))
        except FileNotFoundError:
            self.check_exists()
            raise
        try:
            return self._publish(request, rid, data)
        except BaseException:
            remove_quietly(mark)
            raise

    def _publish(self, request: dict[str, Any], rid: str, data: bytes) -> str:
        name = rid + REQUEST_SUFFIX
        staging, queued = f"{self._tmp}/{name}", f"{self._new}/{name}"
        try:
            fd = create_file(staging)
        except FileNotFoundError:
            self.check_exists()
            raise
        try:
            write_all(fd, data)
            if self.durable:
                os.fsync(fd)
                # kept for the fsync after the rename: read-only, so that its
                # close is no IN_CLOSE_WRITE in new/ (a second wake-up per request)
                check = os.open(staging, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except BaseException:
            discard_new_file(fd, staging)
            raise
        os.close(fd)   # before the rename: its IN_CLOSE_WRITE is in tmp/, unwatched
        try:
            os.rename(staging, queued)
        except BaseException:
            if self.durable:
                os.close(check)
            remove_quietly(staging)
            raise
        if not self.durable:
            return rid
        try:
            os.fsync(check)
        except OSError:
            # queued but perhaps not on disk: take it back so that the caller's
            # error is true ("nothing queued"); if the worker has claimed it
            # already it is accepted, and runs
            try:
                os.unlink(queued)
            except FileNotFoundError:
                return rid
            raise
        finally:
            os.close(check)
        return rid

    def withdraw(self, rid: str, answer: dict[str, Any] | None = None) -> bool:
        """See ``_withdraw``; with ``answer`` (an operator's cancel) the
        reply follows the withdrawal, best effort: the cancel itself stands.
        The answer never touches ``active/`` nor a reply the worker staged
        (``answer_withdrawn``)."""
        if not self._withdraw(rid):
            return False
        if answer is not None:
            try:
                self.answer_withdrawn(rid, answer)
            except OSError:
                pass
        return True

    def may_answer(self) -> bool:
        # only the worker user writes replies a client trusts
        return os.geteuid() == self.worker_uid()

    def _withdraw(self, rid: str) -> bool:
        """Cancel: take ``new/ID.json`` out of the queue.  Atomic against
        ``claim``'s rename, so either the worker has it or nobody ever will.
        The request is moved aside to ``tmp/`` under a name nobody can guess
        (members cannot list ``tmp/``, and it is opened by name: no FIFO or
        link can be swapped in); with ``durable`` that file is fsynced (which
        commits the rename, as in ``publish``): a cancel reported done
        survives a power cut.  Not withdrawn when a request of that id is
        claimed (running, or held for its target): what was taken out of
        ``new/`` is then a second file under its name."""
        if not valid_id(rid):
            return False
        aside = f"{self._tmp}/{rid}.{secrets.token_hex(8)}{WITHDRAWN_SUFFIX}"
        try:
            os.rename(f"{self._new}/{rid}{REQUEST_SUFFIX}", aside)
        except FileNotFoundError:
            return False
        if self.durable:
            self._make_durable(rid, aside)
        claimed = os.path.lexists(f"{self._active}/{rid}{REQUEST_SUFFIX}")
        if not claimed:
            self._unmark(aside)
        remove_quietly(aside)
        return not claimed

    def _make_durable(self, rid: str, aside: str) -> None:
        try:
            fd = os.open(aside, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError:
            # not the submitter's own file: root or the worker user, who own tmp/
            fsync_dir(self._tmp)
            return
        except OSError as exc:
            log.warning("withdrawn request %s could not be made durable: %s", rid, exc)
            return
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fsync(fd)
        finally:
            os.close(fd)

    def _unmark(self, request_path: str) -> None:
        """Remove the pending mark a request file names (its own, validated)."""
        try:
            marker = json.loads(read_untrusted(request_path, self.max_request_bytes,
                                               reader="this process").data).get("marker")
        except (UnsafeEntry, OSError, ValueError, AttributeError):
            return
        self.release_mark(marker)

    def release_mark(self, marker: object) -> None:
        """Never raises: a mark is a hint for the reducer's gate, and a
        member's folder under a mark's name must not stop an answer (what
        cannot be removed keeps a batch pending, which a member could do
        with a mark of its own; the janitor reports it)."""
        if valid_marker(marker):
            for name in (marker, f"{marker}{HELD_SUFFIX}"):
                _remove_mark(f"{self._pending}/{name}")

    def hold_mark(self, marker: object) -> None:
        """The request is answered, its hooks still to retry: its mark now
        stands for its batch alone (``queue_length`` no longer counts it)."""
        if valid_marker(marker):
            try:
                os.rename(f"{self._pending}/{marker}", f"{self._pending}/{marker}{HELD_SUFFIX}")
            except OSError as exc:
                if not isinstance(exc, FileNotFoundError):
                    log.warning("pending mark %s not held: %s", marker, exc)

    def pending_batches(self) -> set[str]:
        # many marks, few batches: decode each batch once (the reducer asks
        # on every poll, with thousands queued)
        encoded = {name[16:].removesuffix(HELD_SUFFIX) for name in self._marks()
                   if len(name) > 17 and name[16] == "~"}
        return {batch for batch in (batch_of_marker("0" * 16 + tail) for tail in encoded)
                if batch is not None}

    def queue_length(self) -> int:
        return sum(1 for name in self._marks() if (len(name) == 16 or (
            len(name) > 17 and name[16] == "~")) and not name.endswith(HELD_SUFFIX))

    def _marks(self) -> list[str]:
        try:
            return os.listdir(self._pending)
        except FileNotFoundError:
            self.check_exists()
            raise

    def expect(self, rid: str) -> Waiter:
        try:
            return shared_watcher().expect(self.replies, rid + REQUEST_SUFFIX)
        except FileNotFoundError:
            raise SpoolSetupError(f"no spool at {self.root}: run 'spoolops init'") from None

    def collect(self, rid: str, remove: bool = True, submitter: str | None = None,
                op: str | None = None, reader: str = "this client", quiet: bool = False
                ) -> dict[str, Any] | None:
        """The reply published for ``rid`` if it is one to trust: a plain file
        owned by the worker user, a JSON object whose ``id`` is ``rid``.
        None when there is none yet, or only something else under its name
        (``replies/`` is group-writable: anyone in the group may plant one).
        Raises ``SpoolSetupError`` when the worker's own reply cannot be read
        by this process: a deployment fault no retry will mend."""
        path = f"{self._replies}/{rid}{REQUEST_SUFFIX}"
        try:
            f = read_untrusted(path, MAX_REPLY_BYTES, reader=f"{reader} (uid {os.geteuid()})")
        except FileNotFoundError:
            return None
        except (UnsafeEntry, BlockingIOError) as exc:  # BlockingIOError: a lease on it
            self._unreadable_reply(path, exc)
            return None
        if f.st.st_uid != self.worker_uid():
            if not quiet:
                log.warning("ignoring reply for %s owned by uid %d, not the worker's (%d)",
                            rid, f.st.st_uid, self.worker_uid())
            return None
        try:
            obj = json.loads(f.data)
        except ValueError:
            log.warning("ignoring reply for %s that is not valid JSON", rid)
            return None
        if not isinstance(obj, dict) or obj.get("id") != rid:
            log.warning("ignoring reply for %s whose id does not match", rid)
            return None
        if not _answers(obj, submitter, op):
            return None
        if remove:
            # (any member may unlink in replies/ anyway: checking which file
            # the name holds before removing it would protect nothing)
            remove_quietly(path)
        return obj

    def _unreadable_reply(self, path: str, exc: Exception) -> None:
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if isinstance(exc, UnsafeEntry) and "permission denied" in exc.reason and \
                st is not None and st.st_uid == self.worker_uid():
            raise SpoolSetupError(
                f"the reply {path} from the worker cannot be read by this process"
                f" (uid {os.geteuid()}; the file's mode {stat.S_IMODE(st.st_mode):04o},"
                f" gid {st.st_gid}): replies must carry the submit group; run"
                " 'spoolops doctor'") from None
        log.warning("ignoring untrustworthy reply file %s: %s", path, exc)

    def submitter_name(self) -> str:
        # the owner of the request files this process creates
        return user_name(os.geteuid())

    def progress_of(self, rid: str) -> dict[str, Any] | None:
        # read as any file of the spool (root's 'spoolops call' reads it too):
        # never through a link, never a FIFO, never more than a run record is
        try:
            record = read_untrusted(f"{self._active}/{rid}{RUN_SUFFIX}", MAX_RUN_RECORD_BYTES,
                                    limit_name="a run record's size")
            progress = json.loads(record.data).get("progress")
        except (OSError, UnsafeEntry, ValueError, AttributeError):
            return None
        return progress if isinstance(progress, dict) else None


def _answers(reply: dict[str, Any], submitter: str | None, op: str | None) -> bool:
    """Whether ``reply`` answers ``submitter``'s request for ``op`` (each
    unchecked when None): a reply to another member's request under the same
    id is not this client's answer."""
    # a reply naming no op answers a request that was never parsed (refused
    # as malformed, or cancelled by an operator), one naming no submitter a
    # request whose file is gone (recovery after a power cut): only the
    # worker writes either, and a member cannot make it write one for an id
    if (submitter is None or reply.get("submitted_by") in (submitter, None)) and \
            (op is None or reply.get("op") in (op, None)):
        return True
    log.warning("ignoring reply for %s: it answers %r's request for %r, not %r's for %r",
                reply.get("id"), reply.get("submitted_by"), reply.get("op"), submitter,
                op or "any op")
    return False



def _remove_mark(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        try:
            os.rmdir(path)        # an empty folder a member put there
        except OSError:
            log.warning("pending mark %s not removed: %s", path, exc)
