"""Errors that mean "bad input the user can fix". The CLI prints them without a traceback.

Messages name the file, key or value at fault and say what to do.
"""


class UserError(ValueError):
    """Bad input: a file, checkpoint key, dataset or value that cannot work as given."""
