"""Named registries: one per kind of pluggable piece (datasets, augmentation policies, ...).

A user adds an entry from their own module, without editing the package::

    from xnorpp.data import DATASETS

    @DATASETS.register("my_data")
    def build_my_data(*, image_size: int, augment: str | bool, **kwargs): ...

and then selects it by name from a config (``data.name=my_data``). Names are case-insensitive. The
trainer imports the modules a config lists under ``imports`` (:func:`import_modules`) before it looks a
name up: ``python train.py imports=[my_data] data.name=my_data``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Generic, TypeVar

__all__ = ["Registry", "import_modules"]

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A name -> object mapping filled by the :meth:`register` decorator.

    ``kind`` names the registry in error messages (``"dataset"``), ``where`` says how a user picks an
    entry (``"data.name"``) and ``symbol`` where the registry lives (``"xnorpp.data.DATASETS"``), so an
    unknown name gets an error that lists the valid ones and says how to add another.
    """

    def __init__(self, kind: str, where: str, symbol: str) -> None:
        self.kind, self.where, self.symbol = kind, where, symbol
        self._entries: dict[str, T] = {}

    @staticmethod
    def _key(name: str) -> str:
        return str(name).strip().lower()

    def register(self, name: str, *, override: bool = False) -> Callable[[T], T]:
        """Decorator registering its target under ``name``; a taken name is an error unless ``override``."""
        key = self._key(name)

        def add(obj: T) -> T:
            if key in self._entries and not override:
                raise ValueError(
                    f"{self.kind} {key!r} is already registered; pick another name or pass override=True"
                )
            self._entries[key] = obj
            return obj

        return add

    def unregister(self, name: str) -> T:
        """Remove and return the entry called ``name`` (``KeyError`` if there is none)."""
        return self._entries.pop(self._key(name))

    def get(self, name: str) -> T:  # type: ignore[override]
        """The entry called ``name``; an unknown name raises ``ValueError`` listing the valid names."""
        try:
            return self._entries[self._key(name)]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r} ({self.where}); valid choices: {', '.join(self)}. "
                f"Add one with @{self.symbol}.register(NAME) in your own module"
            ) from None

    def __getitem__(self, name: str) -> T:
        return self._entries[self._key(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self)})"


def import_modules(specs: Iterable[str]) -> list[ModuleType]:
    """Import each of ``specs``, a module name (``my_pkg.my_data``, importable from ``sys.path``) or the
    path of a Python file (``path/to/my_data.py``, imported as ``my_data``), so that its registrations
    run. A module already imported is not imported again."""
    modules = []
    for spec in specs:
        spec = str(spec)
        if not spec.endswith(".py"):
            modules.append(importlib.import_module(spec))
            continue
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(
                f"imports: no such file {spec!r} (a module name or the path of a .py file)"
            )
        name = path.stem
        loaded = sys.modules.get(name)
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
            modules.append(loaded)
            continue
        found = importlib.util.spec_from_file_location(name, path)
        assert found is not None and found.loader is not None
        module = importlib.util.module_from_spec(found)
        sys.modules[name] = module  # pickling (DataLoader workers, joblib) finds its classes by name
        found.loader.exec_module(module)
        modules.append(module)
    return modules
