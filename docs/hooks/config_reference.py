"""MkDocs hook: the configuration reference, generated from the pydantic schema.

`docs/configuration.md` holds the marker below; this hook replaces it with one table per section
of `FederationConfig`, each row a field's dotted name, type, default and docstring. The schema is
the one source: a field without a docstring fails the build, so the page cannot fall behind it.
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MARKER = "<!-- config-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    from fedlib.config import FederationConfig

    return markdown.replace(MARKER, reference(FederationConfig))


def reference(root: type[BaseModel]) -> str:
    """A section per field of `root` that is a model (or a list of them), then its plain fields."""
    out: list[str] = []
    for name, field in root.model_fields.items():
        model, suffix = _model_of(field.annotation)
        if model is None:
            continue
        out += [f"## `{name}`", "", inspect.cleandoc(model.__doc__ or ""), ""]
        if field.description:
            out += [field.description, ""]
        out += ["| field | type | default | meaning |", "|---|---|---|---|"]
        out += _rows(model, f"{name}{suffix}.")
        out.append("")
    return "\n".join(out)


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        nested, suffix = _model_of(field.annotation)
        if nested is not None:
            rows += _rows(nested, f"{prefix}{name}{suffix}.")
            continue
        if not field.description:
            raise ValueError(f"{model.__name__}.{name} has no docstring: the configuration reference needs one")
        meaning = " ".join(field.description.split()).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | {meaning} |")
    return rows


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model a field holds (directly, optionally, or as a tuple of them: `[]` in its name)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation, ""
    args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
    if len(args) == 1 and inspect.isclass(args[0]) and issubclass(args[0], BaseModel):
        return args[0], "[]" if typing.get_origin(annotation) is tuple else ""
    return None, ""


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args if a is not type(None)) + " or unset"
    if origin is tuple:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list):
        return f"`[{', '.join(map(str, value))}]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"
