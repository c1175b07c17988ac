"""The errors this package raises on bad input. The command line prints them as one line (exit 2); any
other exception, a bug here or in a library below, keeps its traceback."""


class InputError(ValueError):
    """An argument, option, file's content or configuration this package cannot take; the message names it,
    what was expected and what came."""


class MissingFile(InputError, FileNotFoundError):
    """A path the user gave (or a file a directory must hold) that does not exist."""
