"""User-facing errors: one line on stderr, exit code 2, no traceback (see cli.main)."""


class UsageError(Exception):
    """A mistake in the user's input (config, paths, arguments). The CLI prints it as one line and exits 2."""


class TrainingFault(Exception):
    """A run that cannot continue (non-finite loss ...). The last good checkpoint is kept; exit code 1."""
