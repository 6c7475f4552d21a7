"""The one error type a user sees: a single line naming the file, the field and the fix."""


class LangCellError(Exception):
    """Bad input or a bad configuration. The CLI prints it as one line and exits with status 2.

    Raise it with a message of the form "<file or source>: <what is wrong>; <how to fix it>".
    """
