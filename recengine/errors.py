"""User-facing errors.

Every problem a user can fix (bad input, a missing plugin, a wrong parameter) is raised as a
`RecengineError` whose message names the file, column or value and says what to do. The CLI prints
these as one paragraph without a traceback; anything else is a bug and keeps its traceback.
"""


class RecengineError(Exception):
    """An error the user can act on; the message is the whole explanation."""


class DataError(RecengineError):
    """Input data does not satisfy the data contract."""


class PluginError(RecengineError):
    """A plugin failed to load or register, or a requested plugin part does not exist."""


class ConfigError(RecengineError):
    """A feature set or parameter is invalid."""


class BadValue(DataError):
    """A value in the data that a part cannot use (an image path that is missing or not an image).

    Raised where only the value is known (an encoder sees paths, not rows); `value` is that value, so a
    caller that knows where it came from can name the rows that hold it (see
    `recengine.features.interest.item_embeddings`)."""

    def __init__(self, message: str, value: str):
        super().__init__(message)
        self.value = value

    def __reduce__(self):  # keeps `value` across processes (a Ray actor raising it)
        return type(self), (str(self), self.value)


class StoreError(RecengineError):
    """The MLflow store cannot be opened or written (not a database, no room left, an unwritable folder)."""
