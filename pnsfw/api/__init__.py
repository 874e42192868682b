"""The HTTP API and audit page: `create_app(store, model, settings)`, served by `pnsfw serve`."""

from .engine import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):  # keeps `import pnsfw.api` free of FastAPI until the app is built
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
