"""The one exception type users see: raised where bad input enters, printed by the CLI as one line."""


class SvdiclError(ValueError):
    """A problem with the user's input or environment, with a message that names the fix."""
