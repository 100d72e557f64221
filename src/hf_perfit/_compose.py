"""Dataclasses whose fields are taken from the dataclasses that declare them (type, default, help), so a setting is
declared once however many configs expose it (`FederatedConfig`, `recipes/perfit_single.py`'s `PerFITArguments`)."""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any


def compose(
    sources: Mapping[str, tuple[type, str]], overrides: Mapping[str, Any] | None = None
) -> Callable[[type], type]:
    """Class decorator: make the class a dataclass with one field per `sources` entry, in that order, followed by the
    fields the class body declares itself.

    Args:
        sources (`Mapping[str, tuple[type, str]]`): field name -> (the dataclass that declares it, its name there).
            The field gets that declaration's type annotation, `metadata` (help) and default.
        overrides (`Mapping[str, Any]`, *optional*): field name -> a default that replaces the source's (a list or
            dict value becomes a `default_factory` returning a copy).
    """
    overrides = dict(overrides or {})

    def decorate(cls: type) -> type:
        annotations = {}
        for key, (source, name) in sources.items():
            declared = source.__dataclass_fields__[name]
            annotations[key] = typing.get_type_hints(source)[name]
            if key in overrides:
                value = overrides[key]
                mutable = isinstance(value, list | dict | set)
                kwargs = {"default_factory": lambda v=value: copy.deepcopy(v)} if mutable else {"default": value}
            elif declared.default_factory is not dataclasses.MISSING:
                kwargs = {"default_factory": declared.default_factory}
            else:
                kwargs = {"default": declared.default}
            # HfArgumentParser passes every metadata entry to argparse: only the source's own
            setattr(cls, key, dataclasses.field(metadata=dict(declared.metadata), **kwargs))
        own = dict(cls.__dict__.get("__annotations__", {}))  # fields the class declares itself come after
        if set(own) & set(annotations):
            raise TypeError(
                f"{cls.__name__} declares {sorted(set(own) & set(annotations))} and takes them from sources"
            )
        cls.__annotations__ = {**annotations, **own}
        return dataclasses.dataclass(cls)

    return decorate


__all__ = ["compose"]
