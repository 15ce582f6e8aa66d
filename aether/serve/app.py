"""`aether serve`'s web app (FastAPI): the page and its static files, map tiles, questions in words
and "places like this", their top-k places and downloads. Every route reads only the rasters and
files given on the command line, the package's static files, and what its own searches wrote;
a bad request gets a 4xx with one line of message, never a traceback."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field
from threadpoolctl import threadpool_limits

from aether.core.errors import AetherError, first_line, install_hint
from aether.data.poi import read_poi_frame
from aether.geo.raster import RasterInfo, open_raster
from aether.model.projector import Projector
from aether.retrieval.search import SearchOptions
from aether.serve.layers import EmbeddingLayer, colour_stops
from aether.serve.queries import MAX_QUERY_CHARS, Busy, QueryBook

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_ZOOM = 22
MAX_POIS = 20_000  # POIs sent to the page at most (the first, in file order)


class Ask(BaseModel):
    """A question in words (its length is checked again, in words, by the query book)."""

    text: str = Field(max_length=4 * MAX_QUERY_CHARS)


@dataclass
class ServeOptions:
    """What the server shows: the AETHER raster `emb_tif` (or one inferred from `ae_tif` at start),
    AlphaEarth's own PCA layer when `ae_tif` is given, the POIs of `poi`."""

    ckpt: str
    emb_tif: str
    ae_tif: str | None = None
    poi: str | None = None
    top_k: int = 10
    nms_m: float = 100.0


@contextlib.asynccontextmanager
async def one_blas_thread(app):
    """While the app serves, numpy's BLAS (OpenBLAS) runs one thread: tiles are painted PAINTERS
    at a time, one per core, and OpenBLAS's own threads beside them made a question's tiles take
    about twice as long (the example's, in the page: 0.27-0.40 s, 0.12-0.15 s with one). The searches score
    with torch, whose threads this leaves alone."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def require_serve_extra() -> None:
    """Import the web libraries once, here (threads importing rio-tiler at once break its import),
    or say in one line which extra installs them."""
    try:
        import fastapi  # noqa: F401
        import rio_tiler.io  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise AetherError(f"aether serve needs {exc.name}: {install_hint('serve')}") from None


def create_app(options: ServeOptions, work_dir: Path | None = None):
    """The FastAPI app; searches write into `work_dir` (a temporary folder by default)."""
    require_serve_extra()
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, Response
    from fastapi.staticfiles import StaticFiles

    projector = Projector(options.ckpt, device="cpu", precision="fp32")
    info = open_raster(options.emb_tif, projector.latent_dim)
    own_dir = tempfile.TemporaryDirectory(prefix="aether-serve-") if work_dir is None else None
    folder = Path(own_dir.name) if own_dir else Path(work_dir)
    aether_layer = EmbeddingLayer(info, folder)
    ae_layer = EmbeddingLayer(open_raster(options.ae_tif, projector.n_bands), folder) if options.ae_tif else None
    search = SearchOptions(top_k=options.top_k, nms_m=options.nms_m, device="cpu", heatmaps=False).check()
    book = QueryBook(projector, options.ckpt, options.emb_tif, aether_layer, folder, search)
    book.warm_up()
    aether_layer.warm_up()
    pois = poi_features(options.poi, info) if options.poi else {"type": "FeatureCollection", "features": []}

    app = FastAPI(title="AETHER", docs_url=None, redoc_url=None, openapi_url=None, lifespan=one_blas_thread)
    app.state.book, app.state.own_dir = book, own_dir

    add_error_handlers(app)

    def check_tile(z: int, x: int, y: int) -> None:
        if not (0 <= z <= MAX_ZOOM and 0 <= x < 2**z and 0 <= y < 2**z):
            raise HTTPException(404, f"no tile {z}/{x}/{y}")

    def tile(data: bytes) -> Response:
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    def about():
        west, south, east, north = aether_layer.bounds
        return {
            "name": Path(options.emb_tif).name,
            "checkpoint": Path(options.ckpt).name,
            "bounds": [[south, west], [north, east]],
            "layers": ["aether"] + (["alphaearth"] if ae_layer else []),
            "pois": len(pois["features"]),
            "colours": colour_stops(),
            "top_k": options.top_k,
            "nms_m": options.nms_m,
        }

    @app.get("/tiles/{layer}/{z}/{x}/{y}.png")
    def pca_tile(layer: str, z: int, x: int, y: int):
        check_tile(z, x, y)
        chosen = {"aether": aether_layer, "alphaearth": ae_layer}.get(layer)
        if chosen is None:
            raise HTTPException(404, f"no layer {layer!r}")
        return tile(chosen.pca_tile(z, x, y))

    @app.post("/api/query")
    def ask(body: Ask):
        return book.ask(body.text).summary()

    @app.post("/api/like")
    def like(lon: float, lat: float):
        return book.like(lon, lat).summary()

    def query_of(qid: int):
        query = book.get(qid)
        if query is None:
            raise HTTPException(404, f"no query {qid}")
        return query

    @app.get("/api/query/{qid}")
    def status(qid: int):
        return query_of(qid).summary()

    @app.get("/tiles/q/{qid}/{z}/{x}/{y}.png")
    def score_tile(qid: int, z: int, x: int, y: int):
        check_tile(z, x, y)
        q = query_of(qid)
        return tile(aether_layer.score_tile(f"q{qid}", q.vector, q.low, q.high, z, x, y))

    def search_file(qid: int, attribute: str, media_type: str, what: str):
        """A file the query's search wrote (as `aether retrieve` writes it), once it is done."""
        q = query_of(qid)
        path = getattr(q, attribute)
        if path is None:
            raise HTTPException(409, f"query {qid} is {q.status}; {what} when the search is done")
        return FileResponse(path, media_type=media_type, filename=path.name)

    @app.get("/api/query/{qid}/heatmap.tif")
    def heatmap(qid: int):
        return search_file(qid, "tif", "image/tiff", "its GeoTIFF comes")

    @app.get("/api/query/{qid}/places.geojson")
    def places(qid: int):
        return search_file(qid, "geojson", "application/geo+json", "its places come")

    @app.get("/api/pois")
    def poi_layer():
        return pois

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def add_error_handlers(app) -> None:
    """Every error as JSON {"error": one line}: 400 for bad input, 404/409 for what is not there
    (yet), 422 for a malformed request, 429 when busy, 500 (and one log line) for a bug."""
    from fastapi import HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(AetherError)
    async def aether_error(request: Request, exc: AetherError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy):
        return JSONResponse({"error": str(exc)}, status_code=429)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else "request"
        return JSONResponse({"error": f"{where}: {errors[0]['msg'] if errors else 'invalid'}"}, status_code=422)

    @app.middleware("http")
    async def unexpected(request: Request, call_next):  # one line in the log, never a traceback
        try:
            return await call_next(request)
        except Exception as exc:
            logger.warning(f"{request.method} {request.url.path}: {type(exc).__name__}: {first_line(exc)}")
            return JSONResponse({"error": "internal error; the server's log has one line about it"}, status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def not_found(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


def poi_features(path: str, info: RasterInfo) -> dict:
    """The POIs (points with their descriptions) as GeoJSON in lon/lat, at most MAX_POIS."""
    frame = read_poi_frame(path)
    frame = frame[frame.geometry.notna()].to_crs("EPSG:4326").head(MAX_POIS)
    text = next((c for c in ("description", "name", "text") if c in frame.columns), None)
    features = []
    for i, geometry in enumerate(frame.geometry):
        point = geometry.representative_point()
        label = str(frame[text].iloc[i]) if text else ""
        features.append({"type": "Feature", "properties": {"text": label[:300]}, "geometry": point.__geo_interface__})
    return {"type": "FeatureCollection", "features": features}
