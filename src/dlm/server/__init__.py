"""The HTTP server of `dlm serve`: an OpenAI-compatible API plus infilling and live denoising (docs/http-api.md).

Needs the `serve` extra (fastapi, uvicorn): `pip install "dlm[serve]"`.

    from dlm.server import ServerSettings, create_app
    app = create_app(lm, "default", ServerSettings(batch_size=16))
"""

from dlm.server.app import create_app
from dlm.server.settings import ServerSettings

__all__ = ["create_app", "ServerSettings"]
