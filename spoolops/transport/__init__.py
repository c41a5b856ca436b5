"""How requests travel and replies return: the transport interface and its
implementations (see ``base``).  ``open_transport`` builds the one the
configuration names; the filesystem spool is the default.
"""

from __future__ import annotations

from ..config import Config
from .base import Transport


def transport_class(config: Config) -> type[Transport]:
    """The class of ``config``'s transport (``[spool] transport``): what it
    says of itself before there is one (``create_options``, ``ready_line``,
    ``submit_group_folders``).  The one place that reads the setting."""
    if config.transport == "postgresql":
        try:
            from .pg import PgTransport
        except ImportError as exc:
            from ..errors import SpoolSetupError
            raise SpoolSetupError(f"[spool] transport = postgresql needs psycopg 3 and"
                                  f" psycopg_pool: pip install 'spoolops[postgresql]'"
                                  f" ({exc})") from None
        return PgTransport
    from .spool import SpoolTransport
    return SpoolTransport


def open_transport(config: Config) -> Transport:
    """The transport of ``config``."""
    return transport_class(config).from_config(config)


__all__ = ["Transport", "open_transport", "transport_class"]
