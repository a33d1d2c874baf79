"""The configuration reference page, generated from the typed config in :mod:`recsys_metric.config`.

The documentation site's ``docs/configuration.md`` carries a marker line that the MkDocs hook
``docs/hooks.py`` replaces with :func:`config_reference_markdown` at build time, so the page lists
exactly the fields, types, defaults, bounds and docstrings of the code being documented: a field
added to a section appears without anyone editing the docs.
"""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from recsys_metric.config import Config

MARKER = "<!-- config-reference -->"
"""The line of ``docs/configuration.md`` that the generated reference replaces."""

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _inline_markdown(text: str) -> str:
    """reStructuredText-style inline markup of the docstrings as Markdown.

    ````code```` becomes ```code```; ``:meth:`x```, ``:func:`~a.b``` and friends become ```x``` /
    ```b``` (the tilde keeps the last dotted part, as in Sphinx).
    """
    text = re.sub(r":[a-z]+:`~([^`]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"`\1`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _clean(doc: str | None) -> str:
    if not doc:
        return ""
    lines = [line.strip() for line in doc.strip().splitlines()]
    paragraphs = " ".join(line if line else "\n\n" for line in lines)
    return _inline_markdown(re.sub(r" *\n\n *", "\n\n", paragraphs))


def _type_name(annotation: Any) -> str:
    """A short, YAML-minded name of a field's type: ``int >= 1 | "auto"``, ``list[str]``, ..."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = _type_name(args[0])
        bounds = [
            f"{symbol} {getattr(meta, attr)}"
            for meta in args[1:]
            for attr, symbol in _BOUNDS
            if getattr(meta, attr, None) is not None
        ]
        for meta in args[1:]:
            for sub in getattr(meta, "metadata", ()):
                bounds += [f"{s} {getattr(sub, a)}" for a, s in _BOUNDS if getattr(sub, a, None) is not None]
        return f"{inner} ({', '.join(bounds)})" if bounds else inner
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_type_name(args[0])}]"
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return {"str": "str", "int": "int", "float": "float", "bool": "bool", "datetime": "datetime"}.get(
        getattr(annotation, "__name__", str(annotation)), str(annotation)
    )


def _field_type(field: FieldInfo) -> str:
    name = _type_name(field.annotation)
    bounds = [
        f"{symbol} {getattr(meta, attr)}"
        for meta in field.metadata
        for attr, symbol in _BOUNDS
        if getattr(meta, attr, None) is not None
    ]
    return f"{name} ({', '.join(bounds)})" if bounds else name


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = json.loads(value.model_dump_json())
    elif isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, default=str)


def _section(name: str, model: type[BaseModel], level: int, description: str | None = None) -> list[str]:
    out = [f"{'#' * level} `{name}` {{ #{name.replace('.', '-')} }}", ""]
    for doc in (_clean(description), _clean(model.__doc__)):
        if doc:
            out += [doc, ""]
    nested = []
    for key, field in model.model_fields.items():
        path = f"{name}.{key}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((path, annotation, field))
            continue
        out += [
            f"{'#' * (level + 1)} `{path}` {{ #{path.replace('.', '-')} }}",
            "",
            f"type: `{_field_type(field)}`; default: `{_default(field)}`",
            "",
            _clean(field.description) or "(undocumented)",
            "",
        ]
    for path, sub, field in nested:
        out += _section(path, sub, level + 1, field.description)
    return out


def config_sections() -> list[tuple[str, type[BaseModel]]]:
    """The top-level sections of :class:`~recsys_metric.config.Config`, in file order."""
    return [(name, field.annotation) for name, field in Config.model_fields.items()]


def config_keys() -> list[str]:
    """Every leaf key as a dotted path (``train.lr``, ``data.columns.user_id``, ...)."""

    def walk(prefix: str, model: type[BaseModel]) -> list[str]:
        keys = []
        for key, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                keys += walk(f"{prefix}{key}.", annotation)
            else:
                keys.append(f"{prefix}{key}")
        return keys

    return walk("", Config)


def config_reference_markdown(level: int = 2) -> str:
    """The reference as Markdown: a heading per section and per key, with type, default and docstring.

    Each key's heading has an anchor of its dotted path with ``-`` for ``.`` (``#train-lr``) so
    other pages can link to a key.
    """
    out: list[str] = []
    for name, model in config_sections():
        out += _section(name, model, level)
    return "\n".join(out).rstrip() + "\n"
