"""The strict base every spec model derives from (DeepSpeed's config_utils habit).

Unknown keys are errors at every depth, assignments are re-validated (so `--set` overrides go
through the same checks as the YAML file), and defaults are validated too.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base of all spec sections: forbid unknown keys, validate defaults and assignments."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        validate_default=True,
        use_attribute_docstrings=True,
        frozen=False,
    )
