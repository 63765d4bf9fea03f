"""The error of a configuration that cannot work (re-exported as `plugins.PluginError`):
defined here so that the shared building blocks can raise it without importing the
registry."""


class PluginError(ValueError):
    """A plugin configuration that cannot work; the message names the flags to change."""
