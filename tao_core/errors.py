"""Exceptions with messages that say what was wrong, where, and what to do."""


class TaoError(Exception):
    """Base class of every error tao raises on purpose."""


class TaoInputError(TaoError, ValueError):
    """Bad user input: a malformed file, a wrong field, an invalid parameter."""


class PluginError(TaoError):
    """A plugin failed to load, registered a duplicate name, or raised while running."""


class ModelLoadError(TaoError):
    """A model could not be found, read or converted."""


class TaoWriteError(TaoError, OSError):
    """Writing a run's file failed (disk full, I/O error); what was written before stays valid."""

    def __str__(self) -> str:
        return str(self.strerror)
