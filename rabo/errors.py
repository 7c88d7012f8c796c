"""The project's error hierarchy: every failure a user can cause has a named class."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit statuses of every ``rabo`` command and ``python -m worker`` (their
    meanings: :data:`EXIT_HELP`)."""

    OK = 0
    USAGE = 2
    REFUSED = 3
    GAVE_UP = 4
    PROTOCOL = 5


EXIT_HELP = {  # what each status means: the one description (--help prints it)
    ExitCode.OK: "done (a worker: the run is complete)",
    ExitCode.USAGE: "bad flags, config, input file or state (the message names it); also any "
                    "error that stops a run, e.g. too few workers",
    ExitCode.REFUSED: "a worker was refused for good (token, certificate, client slot)",
    ExitCode.GAVE_UP: "a worker found no coordinator (or no admission) within --give-up-s",
    ExitCode.PROTOCOL: "a worker got a message that breaks the wire contract",
}


def exit_codes_help() -> str:
    """The exit statuses, one line each, for a command's --help."""
    return "exit status:\n" + "\n".join(f"  {int(c)}  {EXIT_HELP[c]}" for c in ExitCode) + \
        "\n  130  interrupted (Ctrl-C)"


class RaboError(Exception):
    """Base class of every error RABO raises on purpose."""


class ConfigError(RaboError, ValueError):
    """A configuration key, type or value is wrong; the message names the key."""


class DataError(RaboError):
    """A data file is missing, truncated or not in the expected format; names the path."""


class ShapeError(RaboError, ValueError):
    """A tensor does not have the shape or dtype its assignment requires."""


class AssignmentError(RaboError):
    """No ratio in the ladder fits a worker's resources; the message says why."""


class UpdateRejected(RaboError, ValueError):
    """A client's update is refused before aggregation (its magnitude); names the part."""
