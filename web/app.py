"""The web front: the search page, the images of answered items, and searches forwarded to TorchServe with the
inference key, which the browser never sees. It offers the default version plus those --versions allows, makes
no management call, and refuses a POST from another site. See docs/web.md."""
import argparse
import ipaddress
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from serving.torchserve import DEFAULT_STATE, ROOT
from visual_search.catalogue.changes import CHANGES_SUFFIX
from visual_search.cli import HelpFormatter
from web.images import DEFAULT_REMEMBERED, ServableImages, answer_items, image_url, resolve_image
from web.middleware import BodyLimit, BodyTooLarge, SameOrigin, SecurityHeaders, normal_origin
from web.torchserve_client import Endpoints, InferenceClient, TorchServeUnavailable
from web.versions import ModelStore, NotOffered, Versions, parse_versions

USAGE = """examples:
  python -m web --images data/fashion-mnist/images            # http://127.0.0.1:8090
  python -m web --images DIR --state-dir .torchserve --model visual-search --port 8090 --versions 2.0
"""

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_IMAGES = ROOT / "data" / "fashion-mnist" / "images"
DEFAULT_MAX_UPLOAD = 6_000_000  # the photo; under TorchServe's max_request_size (6,553,500 bytes) with the form
FORM_ALLOWANCE = 16_384  # the request body may exceed the photo's bound by this much: the form's other parts
FORM_FIELDS = ("image", "listing", "k", "category", "version")


@dataclass
class Settings:
    images: Path
    state_dir: Path = DEFAULT_STATE
    model: str = "visual-search"
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    timeout: float = 120.0
    versions: tuple = ()  # offered besides the default
    allowed_origins: tuple = ()  # other origins whose pages may POST here
    remembered_images: int = DEFAULT_REMEMBERED
    changes: Path = None  # the line's change log (default: <model store>/<model>.changes.sqlite)


def reason(status, message):
    return JSONResponse({"error": message, "status": status}, status_code=status)


def with_image_urls(answer):
    """The answer as TorchServe gave it, plus where the page loads each image from."""
    for item in answer_items(answer):
        item["image_url"] = image_url(item["image"])
    return answer


async def read_search_form(request, max_photo):
    """(photo bytes or None, listing or None, k or None, categories, version or None) from the page's form."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise HTTPException(415, "send multipart/form-data with a photo (field image) or a listing id (field "
                                 "listing)")
    async with request.form(max_files=1, max_fields=len(FORM_FIELDS) + 8) as form:
        unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
        if unknown:
            raise HTTPException(400, f"unknown field(s) {', '.join(unknown)}: use {', '.join(FORM_FIELDS)}")
        upload = form.get("image")
        photo = await upload.read() if isinstance(upload, UploadFile) else None
        text = {name: str(form.get(name)).strip() for name in ("listing", "k", "version")
                if isinstance(form.get(name), str) and form.get(name).strip()}
        categories = [c.strip() for value in form.getlist("category") if isinstance(value, str)
                      for c in value.split(",") if c.strip()]
    if photo is not None and "listing" in text:
        raise HTTPException(400, "send a photo or a listing id, not both")
    if photo is not None and len(photo) > max_photo:
        raise HTTPException(413, f"upload too large: the photo is {len(photo)} bytes, over the limit of "
                                 f"{max_photo} bytes ({max_photo / 1e6:.1f} MB)")
    if photo is None and "listing" not in text:
        raise HTTPException(400, "choose a photo (field image), or a listing id (field listing) for more like it")
    return photo, text.get("listing"), text.get("k"), categories, text.get("version")


def create_app(settings):
    endpoints = Endpoints.from_state(settings.state_dir)
    client = InferenceClient(endpoints, settings.model, timeout=settings.timeout)
    versions = Versions(settings.model, ModelStore(endpoints.model_store, settings.model), settings.images,
                        ask_default=client.default_version, allowed=settings.versions)
    changes = settings.changes or Path(endpoints.model_store) / f"{settings.model}{CHANGES_SUFFIX}"
    images = ServableImages(settings.remembered_images, changes)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        client.close()

    app = FastAPI(title="Visual search", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(HTTPException)
    async def http_error(_request, error):
        return reason(error.status_code, str(error.detail))

    @app.exception_handler(BodyTooLarge)
    async def too_large(_request, error):
        return reason(413, error.reason)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/images/{reference:path}")
    async def catalogue_image(reference: str):
        path = resolve_image(settings.images, reference) if images.is_servable(reference) else None
        if path is None:
            return reason(404, "not a catalogue image")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/api/config")
    async def config():
        return {"model": settings.model, "max_upload_bytes": settings.max_upload_bytes}

    @app.get("/api/versions")
    async def list_versions():
        try:
            return {"model": settings.model, "versions": await run_in_threadpool(versions.list)}
        except TorchServeUnavailable as error:
            return reason(502, f"cannot list the versions of {settings.model}: {error}")

    @app.post("/api/search")
    async def search(request: Request):
        photo, listing, k, categories, version = await read_search_form(request, settings.max_upload_bytes)
        try:
            target, expected = versions.route(version)
            status, answer = await run_in_threadpool(client.search, target, photo, listing, k, categories)
        except NotOffered as error:
            return reason(404, str(error))
        except TorchServeUnavailable as error:
            return reason(502, str(error))
        if status != 200:
            return JSONResponse(answer, status_code=status)
        if target is None:
            versions.note_default(answer.get("model_version"))
        if expected is not None and answer.get("model_version") != expected:
            return reason(404, versions.refusal(expected) + f" (the default is now {answer.get('model_version')})")
        images.record(answer)
        return JSONResponse(with_image_urls(answer), status_code=200)

    # The body bound stops oversized uploads early, before they are read; the photo's own bound is exact.
    return SecurityHeaders(SameOrigin(BodyLimit(app, settings.max_upload_bytes + FORM_ALLOWANCE),
                                      allowed=settings.allowed_origins))


def versions_option(text):
    try:
        return parse_versions(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def origin_option(text):
    origins = [normal_origin(o) for o in text.split(",") if o.strip()]
    for origin in origins:
        scheme, _, host = origin.partition("://")
        if scheme not in ("http", "https") or not host or "/" in host:
            raise argparse.ArgumentTypeError(f"{origin!r} is not an origin: scheme://host[:port], such as "
                                             f"https://search.example.com")
    return origins


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m web", description=__doc__, epilog=USAGE,
                                formatter_class=HelpFormatter)
    p.add_argument("--images", default=str(DEFAULT_IMAGES),
                   help="the catalogue image folder that the answers' image references are relative to "
                        "(default: the demo's, data/fashion-mnist/images)")
    p.add_argument("--state-dir", default=str(DEFAULT_STATE),
                   help="TorchServe's state folder: key_file.json (its inference entry only) and the "
                        "config.properties with the inference address and the model store")
    p.add_argument("--model", default="visual-search", help="the model name in TorchServe")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD / 1e6,
                   help="largest upload accepted, in MB; larger ones get 413")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for TorchServe's answer")
    p.add_argument("--versions", type=versions_option, default=[],
                   help="versions offered besides the default, comma-separated (2.0,3.0); any other is refused "
                        "(default: the default version only)")
    p.add_argument("--allowed-origin", type=origin_option, action="append", default=[],
                   help="another origin (https://search.example.com) whose pages may POST here, such as the "
                        "address of a reverse proxy; repeatable or comma-separated (default: this page's own only)")
    p.add_argument("--changes", default=None, help="the catalogue line's change log: a removed listing's image is "
                                                   "not served (default: <model store>/<model>.changes.sqlite)")
    p.add_argument("--remembered-images", type=positive_int, default=DEFAULT_REMEMBERED,
                   help="how many image references from recent answers the front serves; the least recently used "
                        f"are forgotten first (default {DEFAULT_REMEMBERED})")
    return p.parse_args(argv)


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv=None):
    args = get_args(argv)
    images = Path(args.images)
    if not images.is_dir():
        sys.exit(f"error: the catalogue image folder {images} does not exist (run make demo, or pass --images)")
    if args.max_upload_mb <= 0:
        sys.exit("error: --max-upload-mb must be above 0")
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: the page is reachable from other machines", file=sys.stderr)
    import uvicorn

    settings = Settings(images=images.resolve(), state_dir=Path(args.state_dir), model=args.model,
                        max_upload_bytes=int(args.max_upload_mb * 1e6), timeout=args.timeout,
                        versions=tuple(args.versions), remembered_images=args.remembered_images,
                        changes=Path(args.changes) if args.changes else None,
                        allowed_origins=tuple(o for group in args.allowed_origin for o in group))
    print(f"search page: http://{args.host}:{args.port}/  (catalogue images from {settings.images})", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
