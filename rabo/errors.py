"""The project's error hierarchy: every failure a user can cause has a named class."""

from __future__ import annotations


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
