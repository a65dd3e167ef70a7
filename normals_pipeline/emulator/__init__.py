"""An emulator of the Clipdrop portrait-surface-normals API, served on loopback.

The real API is unreachable from the project's machines; demos and tests run
against this instead. See ``_server`` for the behaviour and ``_normals`` for the
normal-map convention (OpenGL style: +X right, +Y up, +Z toward the viewer).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._normals import BACKGROUND_RGB, render_normal_map
    from ._server import API_PATH, Emulator, EmulatorConfig, Faults, fingerprint, format_decimal

__all__ = [
    "API_PATH",
    "BACKGROUND_RGB",
    "Emulator",
    "EmulatorConfig",
    "Faults",
    "fingerprint",
    "format_decimal",
    "render_normal_map",
]

# Loaded on first use: the CLI reads `_cli`'s options without numpy and Pillow.
_MODULES = {
    "._normals": ("BACKGROUND_RGB", "render_normal_map"),
    "._server": ("API_PATH", "Emulator", "EmulatorConfig", "Faults", "fingerprint", "format_decimal"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
