"""The config's error type and its checks, which name the offending key and value."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the key."""


def require(condition: bool, key: str, message: str, value: object) -> None:
    """Refuses `value` of config key `key` unless `condition` holds (ConfigError)."""
    if not condition:
        raise ConfigError(f"{key}={value!r}: {message}")


def is_int(value: object) -> bool:
    """An int that is not a bool (True is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)
