"""The exceptions that mean "the user asked for something that cannot be done", as opposed to bugs.

`UserError` is the base of every error whose message names the bad option or input and how to fix it
(a bad setting, an unreadable image, missing weights, an engine folder built for something else). The
``supir-rt`` command prints such an error as one ``error: ...`` line and exits with code 2; anything
else is a bug and surfaces as a traceback. From Python, catch `UserError` (it is a `ValueError`).

`SettingError` is a bad value of one `RestoreConfig` field: it keeps the field name, so that the CLI can
name the flag the user typed (``--steps 0``) while the Python API names the field (``num_steps=0``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class UserError(ValueError):
    """A bad option, input or setup; the message says what and how to fix it."""


class SetupError(UserError):
    """The runtime cannot be set up as asked (device, dtype, backend, engines, weights); the message says
    how to fix it."""


class SettingError(UserError):
    """A bad value for the restore setting ``field``; ``fix`` says which values are accepted."""

    def __init__(self, field: str, value: Any, fix: str) -> None:
        super().__init__(f"{field}={value!r}: {fix}")
        self.field, self.value, self.fix = field, value, fix

    def for_flags(self, flags: Mapping[str, str]) -> str:
        """The message with the field replaced by its command-line flag (``flags``: field -> flag)."""
        flag = flags.get(self.field)
        if flag is None:
            return str(self)
        value = self.value if not isinstance(self.value, str) else repr(self.value)
        return f"{flag} {value}: {self.fix}"


__all__ = ["SettingError", "SetupError", "UserError"]
