"""Names a package loads on first use, so a command reads its options (and the core imports) without the
libraries it does not need yet: Dagster, pandas, numpy, Pillow."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_names(
    package: str, modules: Mapping[str, tuple[str, ...]], namespace: dict[str, object]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A package's `__getattr__` and `__dir__` for `modules` (relative module -> the names it gives);
    `namespace` is the package's `globals()`, so `dir()` lists what is loaded and what is not yet."""
    lazy = {name: module for module, names in modules.items() for name in names}

    def getattr_(name: str) -> object:
        if name in lazy:
            return getattr(importlib.import_module(lazy[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted({*namespace, *lazy})

    return getattr_, dir_
