"""The HTTP write API of a catalogue line, for a marketplace backend: POST /listings (id, category, photo),
DELETE /listings/{id}, GET /listings/{id}, GET /status. A bearer key of its own; loopback by default, on a port of
its own (never TorchServe's inference port); a browser's request (one with an Origin header) is refused."""
import base64
import binascii
import hmac
import json
import os
import secrets
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from serving.listings import writer_of
from visual_search.errors import InputError, VisualSearchError
from visual_search.fileio import read_json, write_atomically

MAX_BODY = 8_000_000
KEY_FILE = ".listings-key.json"


def load_or_make_key(path):
    """The API key in `path` (`{"key": ...}`, mode 0600), made the first time."""
    path = Path(path)
    if not path.is_file():
        write_atomically(path, json.dumps({"key": secrets.token_urlsafe(32)}) + "\n")
        os.chmod(path, 0o600)
    key = read_json(path, "listings API key file").get("key")
    if not isinstance(key, str) or len(key) < 16:
        raise ValueError(f"{path} holds no key: delete it, and a new one is made")
    return key


def create_app(writer, key):
    from fastapi import FastAPI, Request  # noqa: PLC0415
    from fastapi.responses import JSONResponse  # noqa: PLC0415

    app = FastAPI(title="Listings", docs_url=None, redoc_url=None, openapi_url=None)

    def refused(status, reason):
        return JSONResponse({"error": reason, "status": status}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.headers.get("origin") is not None:
            return refused(403, "the listings API is for servers: requests from a browser page are refused")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return refused(401, "send the listings API key: Authorization: Bearer <key>")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            return refused(413, f"the request is over {MAX_BODY} bytes")
        return await call_next(request)

    @app.exception_handler(VisualSearchError)
    async def visual_search_error(_request, error):
        return refused(error.status, error.reason)

    @app.post("/listings", status_code=201)
    async def add(request: Request):
        item_id, category, photo, image = await read_listing_request(request)
        return await run_in_threadpool(writer.add, item_id, category, photo, image)

    @app.delete("/listings/{item_id:path}")
    async def remove(item_id: str):
        return await run_in_threadpool(writer.remove, item_id)

    @app.get("/listings/{item_id:path}")
    async def state(item_id: str):
        return await run_in_threadpool(writer.state, item_id)

    @app.get("/status")
    async def status():
        return await run_in_threadpool(writer.status)

    return app


async def read_listing_request(request):
    """(id, category, photo bytes, image reference or None) from multipart (image: the file) or JSON (image:
    base64)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise InputError("the body is not valid JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise InputError('JSON body needs "id", "category" and "image": the photo in base64')
        try:
            photo = base64.b64decode(body["image"], validate=True)
        except (binascii.Error, ValueError):
            raise InputError('"image" is not valid base64') from None
        return body.get("id"), body.get("category"), photo, body.get("image_ref")
    if content_type != "multipart/form-data":
        raise InputError("send multipart/form-data (id, category, image) or JSON", status=415)
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise InputError('the form needs "image", the photo file')
        photo = await upload.read()
        image_ref = form.get("image_ref")
        return form.get("id"), form.get("category"), photo, image_ref if isinstance(image_ref, str) else None


def serve(args):
    import uvicorn  # noqa: PLC0415

    writer = writer_of(args)
    key_file = Path(args.key_file) if args.key_file else Path(args.model_store) / KEY_FILE
    key = load_or_make_key(key_file)
    print(f"listings API for {args.name}: http://{args.host}:{args.port}/  (key in {key_file})", flush=True)
    try:
        uvicorn.run(create_app(writer, key), host=args.host, port=args.port, log_level="info")
    finally:
        writer.close()
