"""What the numbered stages share: model, data, training plumbing, evaluation, sampling."""


class UserError(Exception):
    """Bad input from the user. The CLI prints it as one line on stderr, with no traceback."""
