"""Errors a user can act on. The CLI prints their message (no traceback) and exits with
`exit_code`; anything else escaping a command is a bug and keeps its traceback."""


class UserError(Exception):
    exit_code = 2


class TrainingStopped(UserError):
    """Training stopped on purpose (bad steps, a gate, a lost peer); the last checkpoint is intact."""
    exit_code = 1
