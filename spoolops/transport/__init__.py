"""How requests travel and replies return: the transport interface and its
implementations (see ``base``).  ``open_transport`` builds the one the
configuration names; the filesystem spool is the default.
"""

from __future__ import annotations

from ..config import Config
from .base import Transport


def open_transport(config: Config) -> Transport:
    """The transport of ``config`` (``[spool] transport``)."""
    if config.transport == "postgresql":
        try:
            from .pg import PgTransport
        except ImportError as exc:
            from ..errors import SpoolSetupError
            raise SpoolSetupError(f"[spool] transport = postgresql needs psycopg 3 and"
                                  f" psycopg_pool: pip install 'spoolops[postgresql]'"
                                  f" ({exc})") from None
        return PgTransport(config)
    from .spool import SpoolTransport
    return SpoolTransport(config.root, config.durable, config.max_request_bytes,
                          config.worker_user)


__all__ = ["Transport", "open_transport"]
