"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in what the user asked for: unknown rule or env, bad option, missing checkpoint.

    The message must say what is wrong and what would be valid.
    """
