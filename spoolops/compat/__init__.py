"""Drop-in replacements for the APIs of systems spoolops replaces."""
