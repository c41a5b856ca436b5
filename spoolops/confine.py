"""Confined paths: open files and folders strictly below a trusted root.

Trusts: the root folders named in the configuration (``storage_root``,
``upload_staging_dir``).  Distrusts: every relative path that arrives in a
request.  A relative path is split into components and walked one folder at
a time with ``openat``-style calls and ``O_NOFOLLOW``, so no symbolic link
below the root is ever followed (a link is rejected even when it would stay
inside: telling the two apart safely costs more than it is worth, and the
archive does not need links).  ``..``, absolute paths, empty or ``.``
components, NUL and control characters are rejected before any system call.

Diagnostics: escapes and links raise ``BadRequest``; a missing file raises
``NotFound``.  Callers own the returned descriptors and must close them.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from . import faults
from .errors import BadRequest, NotFound

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_COMPONENT = 255


def split_relative(relpath: object, what: str = "path", allow_empty: bool = False
                   ) -> list[str]:
    """The components of a request-supplied relative path, or ``BadRequest``."""
    if not isinstance(relpath, str):
        raise BadRequest(f"{what} must be a string")
    if relpath == "" and allow_empty:
        return []
    if relpath.startswith("/"):
        raise BadRequest(f"{what} must be relative, not absolute: {relpath!r}")
    parts = relpath.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise BadRequest(f"{what} has an empty, '.' or '..' component: {relpath!r}")
        if any(ord(c) < 32 or ord(c) == 127 for c in part):
            raise BadRequest(f"{what} contains a control character: {relpath!r}")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT:
            raise BadRequest(f"{what} has a component longer than {MAX_COMPONENT} bytes")
    return parts


def split_filename(name: object, what: str = "filename") -> str:
    """A single file name (no folder part)."""
    parts = split_relative(name, what)
    if len(parts) != 1:
        raise BadRequest(f"{what} must be a plain file name without '/': {name!r}")
    return parts[0]


def _link_error(path: str) -> BadRequest:
    return BadRequest(f"{path!r} is or passes through a symbolic link or non-folder; "
                      "refusing to follow it")


def open_root(root: Path) -> int:
    """Open a configured root folder (trusted, so it may itself be a link)."""
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"configured root folder does not exist: {root}") from None


def open_dir(root: Path, parts: list[str], create: bool = False, mode: int = 0o755,
             durable: bool = False) -> int:
    """A descriptor for ``root/parts...``, walking without following links.

    With ``create``, missing folders are made with exactly ``mode`` (not the
    umask's idea of it; a setgid bit inherited from the parent is kept) and,
    when ``durable``, each new entry is fsynced in its parent -- fsyncing only
    the leaf would not keep a new folder across a power cut.
    """
    fd = open_root(root)
    walked = []
    try:
        for part in parts:
            walked.append(part)
            created = False
            try:
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise NotFound(f"folder not found: {'/'.join(walked)}") from None
                    try:
                        os.mkdir(part, mode & 0o777, dir_fd=fd)
                        created = True
                    except FileExistsError:
                        pass  # made by someone else meanwhile: open it below
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _link_error("/".join(walked)) from None
                raise
            if created:
                try:
                    os.fchmod(nfd, (os.fstat(nfd).st_mode & 0o7000) | mode)
                    if durable:
                        faults.fsync(fd)
                except BaseException:
                    os.close(nfd)
                    raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_file(dir_fd: int, name: str, flags: int = os.O_RDONLY, mode: int = 0o600,
              what: str = "file") -> int:
    """Open ``name`` in ``dir_fd`` with ``O_NOFOLLOW``; must be a regular file
    with one link (a hard link could alias a file outside the root)."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     mode, dir_fd=dir_fd)
    except FileNotFoundError:
        raise NotFound(f"{what} not found: {name}") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _link_error(name) from None
        if exc.errno == errno.EEXIST:
            raise
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(f"{what} is not a regular file: {name}")
        if st.st_nlink != 1 and not (flags & os.O_CREAT):
            raise BadRequest(f"{what} has {st.st_nlink} hard links; refusing it: {name}")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def resolve_target(root: Path, relpath: str, what: str = "filename") -> str:
    """The real path of an existing file below ``root``: the serialisation key.

    Verifies the walk (no links, no escape) and that the last component is a
    regular file, without opening it for writing.
    """
    parts = split_relative(relpath, what)
    dfd = open_dir(root, parts[:-1])
    try:
        try:
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise NotFound(f"{what} not found: {relpath}") from None
        if stat.S_ISLNK(st.st_mode):
            raise _link_error(relpath)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(f"{what} is not a regular file: {relpath}")
    finally:
        os.close(dfd)
    return os.path.join(os.path.realpath(root), *parts)
