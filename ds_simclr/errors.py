"""One small error hierarchy; the CLI renders these once, as one line, exit status 2.

Library code raises these for anything a user can fix (a bad spec, a missing file, an impossible
batch size). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. `where` names the file and/or dotted field; `hint` says how."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def one_line(self) -> str:
        """The single line the CLI prints: `where: message (hint)`."""
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.one_line()


class SpecError(UserError):
    """The run spec is malformed, has an unknown key, a wrong type or an impossible value."""


class BatchArithmeticError(SpecError):
    """global_batch cannot be split evenly over the ranks and accumulation steps."""


class DataError(UserError):
    """Input data (manifest, volume, store) is missing or malformed."""


class LaunchError(UserError):
    """The cluster or launcher cannot be set up (bad host list, missing launcher)."""


class TrainingError(UserError):
    """Training cannot go on (e.g. too many non-finite steps in a row); a checkpoint is kept."""
