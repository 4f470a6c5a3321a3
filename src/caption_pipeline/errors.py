"""Errors that mean "your input is wrong", as opposed to a bug in this project."""


class DataError(ValueError):
    """Bad input data or configuration. The message names the file and the field."""
