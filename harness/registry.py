"""Name -> (config class, builder) registries for data sources, models and KD methods.

Each component is one module that defines a pydantic config with a Literal discriminator field and
registers a builder for it; adding a component is adding a file. The package's ``__init__`` imports
every module in it, so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field


class Registry:
    def __init__(self, kind: str, key: str):
        self.kind = kind
        self.key = key
        self._entries: dict[str, tuple[type[BaseModel], Callable[..., Any]]] = {}

    def register(self, config_cls: type[BaseModel]):
        name = config_cls.model_fields[self.key].default
        if not isinstance(name, str):
            raise TypeError(f"{config_cls.__name__}.{self.key} needs a string default naming the {self.kind}")

        def decorator(builder):
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = (config_cls, builder)
            return builder

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def config_class(self, name: str) -> type[BaseModel]:
        return self._entries[name][0]

    def config_classes(self) -> list[type[BaseModel]]:
        return [cls for cls, _ in self._entries.values()]

    def build(self, cfg: BaseModel, *args, **kwargs):
        return self._entries[getattr(cfg, self.key)][1](cfg, *args, **kwargs)

    def union(self):
        """The pydantic type that accepts any registered config, chosen by the discriminator field."""
        classes = tuple(cls for cls, _ in self._entries.values())
        if len(classes) == 1:
            return classes[0]
        return Annotated[Union[classes], Field(discriminator=self.key)]  # noqa: UP007


def import_submodules(package_name: str) -> None:
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
