"""Errors meant for people: raised before any compute, printed by the CLI without a traceback."""

EXIT_USAGE = 2  # argparse's exit code for bad arguments; ours for bad configs too


class ConfigError(ValueError):
    """A configuration that cannot work. The message names the field, the value and the fix."""


def require(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)
