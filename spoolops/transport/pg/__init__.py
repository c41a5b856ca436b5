"""The PostgreSQL queue (see ``docs/design.rst``, *The PostgreSQL transport*).

By side, over one shared value (``queue.PgQueue``: configuration, names,
pools): ``client`` (submit, cancel, collect through definer functions),
``view`` (operators' reads and care), ``worker`` (claims, leases, answers,
liveness: the whole ``PgTransport``); ``schema`` the tables, roles and
functions (versioned), ``conn`` pools, listeners and the worker's advisory
lock.  Trusts: see each module.
"""

from .worker import PgTransport

__all__ = ["PgTransport"]
