"""/docs (Swagger UI) and /redoc from assets shipped in the `fastapi-offline` package: no CDN, works offline."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs/assets"  # under the token guard's public /docs/ prefix
# the pages load nothing from elsewhere (ReDoc's sidebar would fetch its logo from a CDN)
SAME_ORIGIN = {"content-security-policy": "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; "
               "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; worker-src 'self' blob:"}


def assets_dir() -> Path:
    """The folder of swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def add_docs(app: FastAPI) -> None:
    """Serve the docs pages and their assets from this app (create the app with docs_url=redoc_url=None)."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    openapi, title = app.openapi_url or "/openapi.json", f"{app.title} API"

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        page = get_swagger_ui_html(openapi_url=openapi, title=title,
                                   swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS_URL}/favicon.png")
        page.headers.update(SAME_ORIGIN)
        return page

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        page = get_redoc_html(openapi_url=openapi, title=title, redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS_URL}/favicon.png", with_google_fonts=False)
        page.headers.update(SAME_ORIGIN)
        return page
