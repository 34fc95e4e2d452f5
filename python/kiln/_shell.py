"""Shell tasks: a command run in the image by /bin/sh, as Globus Compute's ShellFunction."""

import collections

# WALLTIME_EXIT is the returncode of a command that ran past its walltime.
WALLTIME_EXIT = 124


class ShellResult(collections.namedtuple("ShellResult", "returncode stdout stderr cmd stdout_truncated stderr_truncated",
                                         defaults=(False, False))):
    """How a shell task ended: its return code (124 past its walltime), its
    output (capped by the function's max_result... and the endpoint's output
    cap, with a truncation flag each) and the command that ran."""


class ShellFunction:
    """A shell command to run in an image: submit it to an Executor with
    keyword arguments, which fill the command as str.format does.

        fn = kiln.ShellFunction("python3 -c 'print({x} * 2)'", walltime=10)
        executor.submit(fn, x=21).result()   # ShellResult(0, '42\\n', '', ...)

    The command runs with /bin/sh -c, so pipes, ; and $VAR work; past
    walltime seconds (None: no limit) it is killed and its returncode is 124.
    """

    def __init__(self, cmd, walltime=None, name=None):
        if not isinstance(cmd, str) or not cmd:
            raise ValueError("ShellFunction needs a command string")
        if walltime is not None and walltime < 0:
            raise ValueError("walltime must not be negative")
        self.cmd = cmd
        self.walltime = walltime
        self.name = name

    def registration(self):
        body = {"kind": "shell", "command": self.cmd}
        if self.walltime:
            body["walltime"] = float(self.walltime)
        if self.name:
            body["name"] = self.name
        return body

    def __repr__(self):
        return "ShellFunction(%r, walltime=%r)" % (self.cmd, self.walltime)
