"""The one error type that reaches users as a one-line message and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (config, file, reference, data): not a bug in ckptkd.

    The message is shown as one line, so it must name the field, file or reference at fault.
    """
