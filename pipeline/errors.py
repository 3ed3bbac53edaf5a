"""Every error isostack raises on purpose.

Each error carries a ``cause`` (what is wrong, naming the key path, file or
module) and a ``fix`` (what the user should do). They pickle across Ray actor
boundaries because ``__reduce__`` rebuilds them from their constructor
arguments, not from ``args`` (which Python would otherwise use and lose the
fix).
"""

from __future__ import annotations


class IsostackError(Exception):
    """Base class: ``cause`` says what went wrong, ``fix`` how to put it right."""

    exit_code = 2

    def __init__(self, cause: str, fix: str = "") -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.cause}\n  fix: {self.fix}" if self.fix else self.cause

    def __reduce__(self):
        return (type(self), (self.cause, self.fix))


class ConfigError(IsostackError):
    """One or more problems in a config; ``problems`` holds them all.

    Each problem is ``(key_path, message)`` so `isostack validate` can list
    every problem at once, each naming where in the config it is.
    """

    def __init__(self, problems: list[tuple[str, str]] | str, fix: str = "") -> None:
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems = list(problems)
        lines = [f"{path}: {msg}" if path else msg for path, msg in self.problems]
        n = len(lines)
        head = f"config has {n} problem{'s' if n != 1 else ''}:"
        cause = head + "".join(f"\n  - {line}" for line in lines)
        super().__init__(cause, fix or "edit the config (or the --set value) at the key paths above; `isostack schema` prints every key with its type")

    def __reduce__(self):
        return (type(self), (self.problems, self.fix))


class StoreError(IsostackError):
    """The activation store cannot be reached, read or written."""


class IntegrityError(StoreError):
    """A committed version does not match its manifest (checksum, missing shard)."""


class DataError(IsostackError):
    """A dataset file is missing, truncated or not in the expected format."""


class UndefinedMetricError(DataError):
    """A metric has no value on this data (one class, too few samples per object): reported as undefined, not fatal."""


class TrainingError(IsostackError):
    """A module failed while training (non-finite loss, bad upstream)."""


class LeaseError(IsostackError):
    """Another process holds the lease on a module."""


class RunError(IsostackError):
    """A run directory is missing, mixed up with another run, or in the wrong state."""
