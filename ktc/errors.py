"""The one exception type users see: a message that says what went wrong and what to do.

The CLI prints `error: <message>` on one line and exits non-zero; the Python API raises it.
Anything else escaping is a bug in ktc.
"""


class KtcError(Exception):
    """A user-facing error with a one-line, actionable message."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ArtifactError(KtcError):
    """The artifact is missing, damaged or from an incompatible ktc."""


class HostError(KtcError):
    """This host cannot run the artifact (CPU features, GPU arch)."""


class InputError(KtcError):
    """Bad input to a model: token ids, prompt length, options."""
