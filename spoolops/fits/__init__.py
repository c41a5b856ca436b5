"""FITS header editing for the ``update_headers`` operation.

``update_file`` applies validated edits to one stored file (see ``edit.py``
for the three write strategies); ``parse_values`` turns a request's
``values`` into keyword edits; ``recover_journals`` must run at worker start
(under the worker lock, before any request) to undo in-place rewrites cut
short by a crash.  Trusts what ``spoolops.ops.headers`` validated.
"""

from __future__ import annotations

from .cards import parse_values
from .edit import update_file
from .journal import recover_journals

__all__ = ["parse_values", "recover_journals", "update_file"]
