"""`pnsfw serve`: one uvicorn worker process serving `create_app`."""

from pathlib import Path

from ..errors import BadInput
from .engine import Settings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(store: "str | Path", model: str | None, settings: Settings, log_level: str = "info") -> None:
    """Build the app (models load here, so a bad store or model fails before binding) and run uvicorn."""
    import uvicorn

    from .app import create_app

    if settings.max_upload_mb <= 0:
        raise BadInput("--max-upload-mb must be positive")
    app = create_app(store, model, settings)
    if settings.host not in LOOPBACK and not settings.token:
        print(f"warning: serving on {settings.host} without PNSFW_API_TOKEN: anyone who can reach it can query it")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=5)
