"""The spool worker's answering half: the one reply, kept-aside requests, and
finishing what a dead worker left half-done.

An answer is two steps a crash can cut between: the reply is written whole
to ``work/ID.reply`` (from then on the request counts as done), then
``active/ID.json`` is unlinked and the reply renamed into ``replies/`` --
never over a reply the worker wrote, so a client never reads two.  A request
that cannot run safely is moved to ``failed/`` beside ``failed/NAME.reason``;
an ``Interrupted`` one also gets its reply, its reason noted first in
``work/ID.failing``.  ``settle`` (under the worker lock, before recovery
looks at orphans) finishes each of these the way the dead worker would have:
a whole staged reply is published (its request moved aside first when the
note says it was being failed), one cut off while being written is dropped
while its request is there to be answered again, and replaced by
``Interrupted`` when it is not; an orphan whose reply is already out is only
cleared; scratch files go.

Trusts: ``work/`` and ``active/`` (only the worker writes them).  Distrusts
``replies/`` (group-writable): a plant under a reply's name is removed or
moved aside, never read as the worker's.  Part of ``SpoolTransport``, which
holds the paths and the ids this process claimed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ... import faults
from ...files import (
    UnsafeEntry,
    fsync_dir,
    read_untrusted,
    remove_quietly,
    rename_noreplace,
    write_atomic,
    write_new_file,
)
from ...formats import encode_json, utc_iso, valid_id
from ..base import Batch, Quarantined, Step
from .names import (
    FAILING_SUFFIX,
    MAX_REPLY_BYTES,
    REQUEST_SUFFIX,
    RUN_SUFFIX,
    STAGED_REPLY_SUFFIX,
    reason_file_name,
)

log = logging.getLogger("spoolops.transport")

_UNKNOWN = object()
MAX_REASON_BYTES = 65536


class SpoolAnswers:
    """The answering half of ``SpoolTransport``'s worker side."""

    _reply_gid: Any = _UNKNOWN

    def reply(self, rid: str, reply: dict[str, Any], started: bool = True, *,
              deliver: bool = True, batch: Batch | None = None) -> None:
        if not deliver:
            self._retire(rid, started)
        elif self._answered_already(rid):
            # a retry after a failure past the publishing rename (an fsync's
            # error): the answer is out, maybe collected -- never a second one
            log.warning("event=reply_dropped id=%s note=%r", rid, "its request left active/"
                        " and no staged reply waits: it was answered already")
        else:
            self._stage_reply(rid, reply)
            self._publish_staged(rid, started)
        self._mine.discard(rid + REQUEST_SUFFIX)     # after it left active/
        # after the answer, off the waiting client's path: the batch's hooks
        # ran already (or are kept: then the mark stays, held); a mark a crash
        # leaves behind names no request, and the janitor removes it
        if batch is not None:
            if batch.held:
                self.hold_mark(batch.marker)
            else:
                self.release_mark(batch.marker)

    def _answered_already(self, rid: str) -> bool:
        """Neither the claimed request nor a staged reply is there: whatever
        answered it (this worker, before a failure it is retrying past)
        published its one reply.  (Recovery's answer to a request that is
        gone comes with the staged reply it replaces.)"""
        return not os.path.lexists(f"{self._active}/{rid}{REQUEST_SUFFIX}") and \
            not os.path.lexists(f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}")

    def release_batch(self, rid: str, batch: Batch) -> None:
        self.release_mark(batch.marker)

    def _retire(self, rid: str, started: bool) -> None:
        """A request that wants no reply is done: it leaves ``active/``, and
        nothing else is left of it (a crash before this re-runs it, as any)."""
        if started:
            remove_quietly(f"{self._active}/{rid}{RUN_SUFFIX}")
        remove_quietly(f"{self._active}/{rid}{REQUEST_SUFFIX}")
        if self.durable:
            fsync_dir(self._active)

    def _stage_reply(self, rid: str, reply: dict[str, Any], in_place: bool = True) -> None:
        """Write the finished reply to ``work/ID.reply``: from here on the
        request counts as done, even if the worker dies before publishing.

        Written in place (see the module docstring for why that is safe) by
        the worker while ``active/ID.json`` exists.  A staged reply already
        there, and every caller that may run beside a worker or after its
        request left ``active/`` (``in_place=False``: recovery, ``spoolops
        cancel``), go through a temporary file and a rename: a whole staged
        reply is never removed or cut."""
        path = f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}"
        data = encode_json(reply)
        gid = self._reply_group()
        if in_place:
            try:
                write_new_file(path, data, self.durable, gid=gid)
                return
            except FileExistsError:
                pass
        write_atomic(f"{path}.tmp", path, data, self.durable, own_staging=True, gid=gid)

    def _reply_group(self) -> int | None:
        """The group a staged reply must be given explicitly, or None when
        files made in ``work/`` get the submit group anyway (``work/`` is
        setgid to it, or it is this process's own group).  Replies keep
        their group when renamed into ``replies/``, and clients read them
        through it: a worker whose primary group is its own would otherwise
        answer in a group no client is in."""
        if self._reply_gid is _UNKNOWN:
            work, replies = os.stat(self._work), os.stat(self._replies)
            if (work.st_mode & stat.S_ISGID and work.st_gid == replies.st_gid) or \
                    (not work.st_mode & stat.S_ISGID and os.getegid() == replies.st_gid):
                self._reply_gid = None
            else:
                self._reply_gid = replies.st_gid
        return self._reply_gid

    def _publish_staged(self, rid: str, started: bool = True) -> None:
        """Retire ``active/ID.json`` (and its run file, if the op had one) and
        rename the staged reply into ``replies/``.

        The request is removed first so that a crash in between leaves a
        staged reply and no orphan (recovery publishes it): never two replies.
        With ``durable``, one fsync of ``replies/`` commits the lot on a
        journalling filesystem (ext4, xfs: metadata is journalled in order).
        """
        if started:
            remove_quietly(f"{self._active}/{rid}{RUN_SUFFIX}")
        remove_quietly(f"{self._active}/{rid}{REQUEST_SUFFIX}")
        self._publish_noreplace(rid, f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}")

    def _publish_noreplace(self, rid: str, staged: str) -> None:
        """Rename ``staged`` to ``replies/ID.json`` without replacing a reply
        the worker wrote.  Something else under that name (a member's plant)
        is removed first; a trusted reply already there means this is a second
        request with an answered id: its reply is kept in ``failed/`` with a
        reason, and the first one stays the one the client reads."""
        published = f"{self._replies}/{rid}{REQUEST_SUFFIX}"
        for _attempt in range(8):
            try:
                rename_noreplace(staged, published)
                break
            except FileExistsError:
                if self.collect(rid, remove=False, reader="the worker", quiet=True) is None:
                    self._clear_plant(published)   # not the worker's: a member's plant
                    continue
                name = f"{rid}.reply"
                kept_as = self._rename_into_failed(Path(staged).parent, Path(staged).name,
                                                   name)
                self._write_reason(kept_as, f"A reply to {rid} was already published and not"
                                   " yet collected; this reply, to a second request with the"
                                   " same id, was kept here instead")
                log.error("event=duplicate_reply id=%s kept=%s", rid, kept_as)
                break
        else:
            raise FileExistsError(errno.EEXIST, "replies/ keeps being planted", published)
        if self.durable:
            fsync_dir(self._replies)

    def _clear_plant(self, path: str) -> None:
        """Out of the reply's way: unlinked, or -- a folder, which a member
        may have filled with files the worker cannot remove -- renamed aside
        in ``replies/`` (the janitor reaps it after ``reply_ttl``)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("event=reply_plant_moved path=%s", path)
            os.rename(path, f"{self._replies}/.planted-{secrets.token_hex(8)}")

    def answer_withdrawn(self, rid: str, reply: dict[str, Any]) -> bool:
        """Publish an operator's ``Cancelled`` reply to a request just
        withdrawn from ``new/``: staged under a name of its own (never over
        one the worker staged) and published without replacing; never when
        a request with that id runs or was answered (the withdrawn file was
        then a duplicate, and the running one's reply is the answer).  The
        worker's ``active/`` is not touched."""
        if os.path.lexists(f"{self._active}/{rid}{REQUEST_SUFFIX}") or \
                self._id_in_use(rid) is not None:
            return False
        staged = f"{self._work}/{rid}.cancel.{os.getpid()}.tmp"
        remove_quietly(staged)          # a leftover of a process with our pid
        write_new_file(staged, encode_json(reply), self.durable, gid=self._reply_group())
        try:
            rename_noreplace(staged, f"{self._replies}/{rid}{REQUEST_SUFFIX}")
        except FileExistsError:
            remove_quietly(staged)
            return False
        if self.durable:
            fsync_dir(self._replies)
        return True

    def quarantine(self, entry: str, reason: str, claimed: bool) -> Quarantined:
        """Move ``new/NAME`` or ``active/NAME`` to ``failed/`` beside
        ``failed/NAME.reason`` (``NAME~2``... when ``NAME`` is taken there).

        An entry that cannot be moved stays where it is; the reason file is
        written all the same, and ``scan`` skips names that have one.
        """
        directory = self.active if claimed else self.new
        try:
            moved = self._quarantine(directory, entry, reason)
            if claimed:
                self._mine.discard(entry)
        except OSError as exc:
            # the reason could not be written (disk full): an entry still in
            # new/ is skipped from now on, not retried forever
            moved = not os.path.lexists(directory / entry)
            reason = f"{reason} (its reason file could not be written: {exc.strerror or exc})"
        if not moved and not claimed:
            self._skipped.add(entry)
        return Quarantined(entry, reason, moved)

    def _quarantine(self, directory: Path, name: str, reason: str) -> bool:
        moved, kept_as = True, name
        try:
            kept_as = self._rename_into_failed(directory, name)
        except FileNotFoundError:
            return True
        except OSError as exc:
            moved = False
            reason = (f"{reason.rstrip('.')}; it could not be moved out of"
                      f" {directory.name}/ ({exc.strerror or exc}), so it was left there"
                      " and will be skipped.")
        self._write_reason(kept_as, reason)
        if directory == self.active and moved:
            # its run file goes with it; an entry quarantined from new/ (say a
            # duplicate of a running id) must never touch what runs in active/
            remove_quietly(self.active / (name + ".run"))
        return moved

    def _rename_into_failed(self, directory: Path, name: str, as_name: str | None = None
                            ) -> str:
        as_name = as_name or name
        for n in range(1, 100):
            dest = as_name if n == 1 else f"{as_name}~{n}"
            try:
                rename_noreplace(str(directory / name), str(self.failed / dest))
                return dest
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free name in failed/", name)

    def _write_reason(self, name: str, reason: str) -> None:
        line = " ".join(reason.split())
        if not line.endswith("."):
            line += "."
        text = f"{utc_iso()} {socket.gethostname()} pid {os.getpid()}: {line}\n"
        reason_name = reason_file_name(name)
        write_atomic(self.work / f"{reason_name}.tmp", self.failed / reason_name,
                     text.encode("utf-8", "backslashreplace"), self.durable, mode=0o644,
                     own_staging=True)

    def _has_reason(self, name: str) -> bool:
        return os.path.lexists(self.failed / reason_file_name(name))

    def fail(self, rid: str, reply: dict[str, Any], reason: str) -> None:
        """Note the reason in ``work/ID.failing``, stage the reply, move the
        request to ``failed/``, publish: a crash between the steps leaves a
        staged reply (and the note), which ``settle`` finishes the same way."""
        failing = f"{self._work}/{rid}{FAILING_SUFFIX}"
        write_atomic(f"{failing}.tmp", failing, reason.encode("utf-8", "backslashreplace"),
                     self.durable, own_staging=True)
        faults.hit("spool.fail.noted")
        self._stage_reply(rid, reply, in_place=False)
        faults.hit("spool.fail.staged")
        self._quarantine(self.active, rid + REQUEST_SUFFIX, reason)
        faults.hit("spool.fail.kept")
        self._publish_staged(rid)
        faults.hit("spool.fail.published")
        remove_quietly(failing)
        self._mine.discard(rid + REQUEST_SUFFIX)


    # -- after a dead worker (under the worker lock) ------------------------------------

    def settle(self, interrupted: Callable[[str], dict[str, Any]], dry_run: bool = False
               ) -> list[Step]:
        steps = [Step("remove", path, "staging leftover of a dead worker", done=not dry_run)
                 for path in self._leftovers(dry_run)]
        for rid in self._staged_ids():
            steps.append(self._settle_staged(rid, interrupted, dry_run))
        for name in sorted(os.listdir(self._active)):
            rid = name[: -len(REQUEST_SUFFIX)] if name.endswith(REQUEST_SUFFIX) else None
            # the reply a client would trust, not merely something by that name:
            # a planted one must not make an orphan vanish
            if rid is None or not valid_id(rid) or self.collect(
                    rid, remove=False, reader="the worker", quiet=True) is None:
                continue
            if not dry_run:
                remove_quietly(f"{self._active}/{rid}{RUN_SUFFIX}")
                remove_quietly(f"{self._active}/{name}")
                self._mine.discard(name)
                log.warning("event=recovered action=cleared_answered_orphan id=%s", rid)
            steps.append(Step("clear", f"{self._active}/{name}", "an orphan whose reply was"
                              " already published", done=not dry_run))
        return steps

    def _leftovers(self, dry_run: bool) -> list[str]:
        """Staging files in ``work/``, notes of a fail whose reply was never
        staged, and run files whose request is gone: removed unless ``dry_run``."""
        names = sorted(os.listdir(self._work))
        found = [f"{self._work}/{name}" for name in names
                 if name.endswith(".tmp") and _plain(f"{self._work}/{name}")]
        found += [f"{self._work}/{name}" for name in names if name.endswith(FAILING_SUFFIX)
                  and name[: -len(FAILING_SUFFIX)] + STAGED_REPLY_SUFFIX not in names]
        found += [f"{self._active}/{name}" for name in sorted(os.listdir(self._active))
                  if name.endswith(RUN_SUFFIX) and not os.path.lexists(
                      f"{self._active}/{name[: -len('.run')]}")]
        if not dry_run:
            for path in found:
                remove_quietly(path)
        return found

    def _staged_ids(self) -> list[str]:
        return sorted(n[: -len(STAGED_REPLY_SUFFIX)] for n in os.listdir(self._work)
                      if n.endswith(STAGED_REPLY_SUFFIX) and
                      valid_id(n[: -len(STAGED_REPLY_SUFFIX)]))

    def _staged_reply(self, rid: str) -> dict[str, Any] | None:
        """The staged reply of ``rid`` if it is whole (parses, names ``rid``);
        None if there is none or it was cut off while being written.  Read as
        a planted file is (``read_untrusted``: root's janitor runs this too,
        as the worker user, and ``work/`` is that account's):
        ``UnsafeEntry`` for anything but a plain file within the limit."""
        try:
            data = read_untrusted(f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}", MAX_REPLY_BYTES,
                                  check_name=False, reader="the worker",
                                  limit_name="a reply's limit").data
        except FileNotFoundError:
            return None
        try:
            reply = json.loads(data)
        except ValueError:
            return None
        return reply if isinstance(reply, dict) and reply.get("id") == rid else None

    def _settle_staged(self, rid: str, interrupted: Callable[[str], dict[str, Any]],
                       dry_run: bool) -> Step:
        """One staged reply: published (its request moved aside first, when it
        was being failed), dropped, or replaced by ``Interrupted``; left
        alone, and said so, when it (or its note) is no plain file."""
        staged = f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}"
        failing = f"{self._work}/{rid}{FAILING_SUFFIX}"
        try:
            reply, where = self._staged_reply(rid), self.where(rid)
            reason = self._failing_reason(failing)
        except (UnsafeEntry, OSError) as exc:
            why = f"a staged reply (or its note) that is no plain file: left alone ({exc})"
            log.error("event=staged_reply_unsafe id=%s error=%r", rid, str(exc))
            return Step("publish", staged, why, error=str(exc))
        if reply is None and where is not None:
            # cut off while being written, its request still there (in line,
            # running, or put back by 'spoolops requeue'): answered from there
            why = f"a reply cut off while being written; its request ({where}) is answered"
            if not dry_run:
                remove_quietly(staged)
                log.warning("event=recovered action=dropped_partial_reply id=%s", rid)
            return Step("drop", staged, why, done=not dry_run)
        if reply is None:
            why = ("a reply cut off while being written, its request gone: answered"
                   " Interrupted (only a power cut with durable = no leaves one)")
        elif where == "running" and reason is not None:
            why = "an Interrupted reply whose request was being kept aside"
        else:
            why = "a finished reply the dead worker had not published"
        if dry_run:
            return Step("publish", rid, why)
        try:
            if reply is None:
                self._stage_reply(rid, interrupted(rid), in_place=False)
            elif where == "running" and reason is not None:
                self._quarantine(self.active, rid + REQUEST_SUFFIX, reason)
            self._publish_staged(rid)
            remove_quietly(failing)
            self._mine.discard(rid + REQUEST_SUFFIX)
        except OSError as exc:
            # one reply that cannot be published now (disk full, a plant it
            # cannot move) must not keep the worker from serving the rest: it
            # stays staged, and the next start tries again
            log.error("event=recover_publish_failed id=%s error=%r", rid, str(exc))
            return Step("publish", rid, why, error=str(exc))
        log.warning("event=recovered action=published_staged_reply id=%s", rid)
        return Step("publish", rid, why, done=True)


    def _failing_reason(self, path: str) -> str | None:
        """The reason a fail cut short noted, if it noted one."""
        try:
            data = read_untrusted(path, MAX_REASON_BYTES, check_name=False,
                                  reader="the worker", limit_name="a reason's limit").data
        except FileNotFoundError:
            return None
        return data.decode("utf-8", "replace")


def _plain(path: str) -> bool:
    """A regular file, not followed through a link."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False

