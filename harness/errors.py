"""User-facing errors: one line that names the problem and the fix, printed without a traceback."""


class HarnessError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line and exits non-zero."""

    exit_code = 1


class ConfigError(HarnessError):
    """A broken experiment or study file. Exit status 2, like argparse's usage errors."""

    exit_code = 2


class DataError(HarnessError):
    """A dataset that is missing or not laid out as expected."""

    exit_code = 3
