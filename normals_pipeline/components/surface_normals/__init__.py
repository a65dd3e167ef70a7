from .component import SurfaceNormalsComponent

__all__ = ["SurfaceNormalsComponent"]
