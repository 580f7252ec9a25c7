"""The one exception type for errors the user caused (bad input, missing files, wrong model)."""


class UserError(Exception):
    """A problem the user can fix; the CLI prints `llmcli: error: <message>` and exits 2.

    The message is one line and names the offending file, line, field or value.
    """
