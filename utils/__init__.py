"""Helpers shared by the verbs in main.py."""


class UserError(Exception):
    """A mistake the user can fix (a bad option, a missing folder): shown as one line, no traceback."""
