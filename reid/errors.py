"""Errors a user can fix: the CLI prints their message, never a traceback."""


class ReidError(Exception):
    """Base class for errors caused by user input (data, config, files)."""


class DataError(ReidError):
    """A data table, image file or folder is unusable; the message names the file, row and fix."""


class ConfigError(ReidError):
    """A configuration file or --set override is invalid."""
