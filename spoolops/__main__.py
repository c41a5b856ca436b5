"""``python -m spoolops`` is the ``spoolops`` command."""

import sys

from .cli.main import main

sys.exit(main())
