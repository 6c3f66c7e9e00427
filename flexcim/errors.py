"""User-facing errors.

Every check on user input (files, shapes, dtypes, patterns, configs) raises :class:`FlexCimError`
with a single-line message that names the offending value and what was expected.  It subclasses
``ValueError`` so library callers can catch it like any bad-argument error, and the CLI turns it
into ``flexcim: error: <message>`` with exit status 2 instead of a traceback.  A failure of
the work itself (a simulator build or run that fails, an output that cannot be written) is a
:class:`WorkError`: the same one line, exit status 1.
"""


class FlexCimError(ValueError):
    """Bad input: the message is one line naming the value and what was expected."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: multi-line messages from deep inside a library are flattened here.
        super().__init__(" ".join(str(message).split()))


class WorkError(FlexCimError):
    """The input was fine but the work failed (a build, a simulation, writing an output):
    one line, exit status 1."""

    exit_code = 1
