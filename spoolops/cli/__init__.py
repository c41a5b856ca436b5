"""Command-line interface of spoolops (``spoolops SUBCOMMAND``)."""
