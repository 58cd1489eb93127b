"""The strict base every spec model derives from (DeepSpeed's config_utils habit).

Unknown keys are errors at every depth, assignments are re-validated (so `--set` overrides go
through the same checks as the YAML file), and defaults are validated too. A boolean is never
taken for a number: pydantic would turn `epochs: yes` (YAML 1.1 reads `yes` as true) into 1.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _admits(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a field annotation accepts one of `kinds` anywhere in it (unions, tuples, lists)."""
    if isinstance(annotation, type) and issubclass(annotation, kinds) and not issubclass(annotation, BaseModel):
        return True
    return any(_admits(arg, kinds) for arg in typing.get_args(annotation) if not isinstance(arg, (str, int, float)))


def _booleans(value: Any) -> list[bool]:
    """The booleans in a field value: the value itself, or the items of a list or tuple."""
    if isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [item for item in value if isinstance(item, bool)]
    return []


class StrictModel(BaseModel):
    """Base of all spec sections: forbid unknown keys, validate defaults and assignments."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        validate_default=True,
        use_attribute_docstrings=True,
        frozen=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        found = _booleans(value)
        if found and _admits(annotation, (int, float)) and not _admits(annotation, (bool,)):
            raise ValueError(f"expected a number, not the boolean {str(found[0]).lower()}")
        return value
