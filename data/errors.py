"""The one exception the data package raises for problems a user can fix."""


class DataError(ValueError):
    """A user-facing data problem; the message is one line that names the path or setting at fault."""
