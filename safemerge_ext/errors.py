"""The one exception type for bad input: its message is a single line meant for a person."""


class SafeMergeError(Exception):
    """Bad input or an impossible request: says what is wrong, where, and what to do."""
