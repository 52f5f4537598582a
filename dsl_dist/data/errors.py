"""The one error type of the data layer."""


class DataError(ValueError):
    """Input data is missing, malformed or inconsistent; the message names the file and value."""
