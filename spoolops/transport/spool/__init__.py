"""The filesystem spool: the default transport (see ``docs/design.rst``).

By side: ``client`` (the one rename that publishes a request), ``view``
(operators' reads: status, ls, show, tail), ``care`` (init, requeue, the
janitor's removals), ``worker`` (claims, answers, recovery's steps: the
whole ``SpoolTransport``); ``names`` its folders and file names, ``watch``
one inotify instance per process.  Trusts: see each module.
"""

from .worker import SpoolTransport

__all__ = ["SpoolTransport"]
