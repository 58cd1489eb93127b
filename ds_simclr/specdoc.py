"""The README's spec reference, generated from the models so it cannot drift from them.

`python -m ds_simclr.specdoc --write README.md` rewrites the section between the markers; a test
fails when the README is stale.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ds_simclr.spec import RunSpec
from ds_simclr.specbase import StrictModel

START = "<!-- spec-reference:start -->"
END = "<!-- spec-reference:end -->"


def _type_name(annotation: object) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")
    if isinstance(annotation, type):
        text = annotation.__name__
    if typing.get_origin(annotation) is typing.Literal:
        text = " \\| ".join(repr(a) for a in typing.get_args(annotation))
    return text.replace("|", "\\|").replace("\\\\|", "\\|")


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        factory = field.default_factory
        if isinstance(factory, type) and issubclass(factory, StrictModel):
            return "(section)"
        return (factory.__doc__ or "").strip().splitlines()[0]  # e.g. a path that depends on $HOME
    if field.default is PydanticUndefined:
        return ""
    return f"`{field.default}`"


def _section_type(field: FieldInfo) -> type[StrictModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, StrictModel) else None


def spec_reference() -> str:
    """Markdown tables: one per section, every field with its type, default and docstring."""
    lines: list[str] = []
    top = [(name, f) for name, f in RunSpec.model_fields.items() if _section_type(f) is None]
    sections = [(name, f) for name, f in RunSpec.model_fields.items() if _section_type(f) is not None]
    groups: list[tuple[str, str, list[tuple[str, FieldInfo]]]] = [("top level", "", top)]
    for name, field in sections:
        model = _section_type(field)
        groups.append((f"`{name}:`", (field.description or "").strip(), list(model.model_fields.items())))
    for title, about, fields in groups:
        lines += [f"#### {title}", ""]
        if about:
            lines += [about, ""]
        lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in fields:
            doc = " ".join((field.description or "").split())
            lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {doc} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def rewrite(readme: Path) -> bool:
    """Replace the marked section of `readme`; True when it changed."""
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{spec_reference()}{END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        rewrite(Path(sys.argv[2]))
    else:
        print(spec_reference(), end="")
