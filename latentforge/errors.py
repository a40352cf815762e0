"""The two exceptions the command line turns into one line (latentforge/config.py re-exports them)."""


class ConfigError(ValueError):
    """A bad config key or value. The message names the key."""


class AbortError(RuntimeError):
    """A run stopped for a reason the user can act on; the message says what and how."""
