"""User-facing errors: one line naming the problem and the fix.

The CLIs catch :class:`UserError`, print ``error: <message>`` and exit with status 2,
so a bad key, path or file never ends in a traceback (and nothing already recorded is
touched)."""


class UserError(Exception):
    """Bad input from the user (config, paths, files); the message is the whole story."""


class ConfigError(UserError):
    """Unknown key, ablation or value; the message lists what is valid."""


class DatasetError(UserError):
    """Missing or malformed dataset; the message names the path and the expected layout."""
