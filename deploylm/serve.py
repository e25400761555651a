"""HTTP server over Generator (DESIGN.md §2): the public entry points; the code is in deploylm.serving."""
from __future__ import annotations

from deploylm.serving import ApiError, ServeConfig, create_app, serve

__all__ = ["ApiError", "ServeConfig", "create_app", "serve"]
