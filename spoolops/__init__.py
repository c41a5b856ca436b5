"""spoolops: a filesystem spool through which one unix user asks another to
modify data files.  See README.rst; the contract is docs/design.rst.

The public API::

    from spoolops import Client, OpError, Timeout
"""

from .client import Client, Reply
from .errors import (
                     BadRequest,
                     Cancelled,
                     ConfigError,
                     Conflict,
                     Expired,
                     Interrupted,
                     NotFound,
                     OpError,
                     OpFailed,
                     PermissionDenied,
                     SpoolError,
                     Timeout,
                     UnknownOp,
                     WorkerRunning,
)

__version__ = "0.1.0"

__all__ = [
                     "BadRequest",
                     "Cancelled",
                     "Client",
                     "ConfigError",
                     "Conflict",
                     "Expired",
                     "Interrupted",
                     "NotFound",
                     "OpError",
                     "OpFailed",
                     "PermissionDenied",
                     "Reply",
                     "SpoolError",
                     "Timeout",
                     "UnknownOp",
                     "WorkerRunning",
                     "__version__",
]
