"""Errors with an exit code: the CLI prints one line and exits with it."""


class TTGError(Exception):
    """Base class; `exit_code` is what the CLI returns."""

    exit_code = 1


class ConfigError(TTGError):
    """Bad input (flags, env, job spec): nothing was started."""

    exit_code = 2


class BrokerUnavailable(TTGError):
    """The broker could not be reached after bounded retries."""

    exit_code = 2


class BrokerAuthError(TTGError):
    """The broker refused the credentials."""

    exit_code = 2


class JobMismatch(TTGError):
    """A run id was submitted again with a different job spec."""

    exit_code = 2
