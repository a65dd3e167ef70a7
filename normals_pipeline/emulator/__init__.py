"""An emulator of the Clipdrop portrait-surface-normals API, served on loopback.

The real API is unreachable from the project's machines; demos and tests run
against this instead. See ``_server`` for the behaviour and ``_normals`` for the
normal-map convention (OpenGL style: +X right, +Y up, +Z toward the viewer).
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_names

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
__getattr__, __dir__ = lazy_names(__name__, _MODULES, globals())
