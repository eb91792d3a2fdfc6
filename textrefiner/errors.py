"""Errors that a user can act on: each message says what went wrong and what to do."""


class UserError(Exception):
    """A problem in the user's input (paths, config, checkpoints), reported without a traceback."""
