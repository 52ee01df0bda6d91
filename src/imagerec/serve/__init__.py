"""HTTP serving: `create_app(settings)` and `serve(...)`; the same Predictor as `imagerec predict`.

Example:
    >>> from imagerec.serve import serve
    >>> serve(["runs/mnist"], port=8000)
"""

from imagerec.serve.app import create_app, create_server, serve
from imagerec.serve.settings import ServeSettings, create_settings

__all__ = ["ServeSettings", "create_app", "create_server", "create_settings", "serve"]
