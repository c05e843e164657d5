"""Errors that mean "bad input the user can fix". The CLI prints them without a traceback.

Messages name the file, key or value at fault and say what to do.
"""


class UserError(ValueError):
    """Bad input: a file, checkpoint key, dataset or value that cannot work as given."""


def some_names(names: list[str], limit: int = 10, sep: str = ", ") -> str:
    """`names` joined by `sep`, at most `limit` of them and then how many more (a model whose every
    weight is at fault, say, names its first few instead of hundreds)."""
    shown = sep.join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
