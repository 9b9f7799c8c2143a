"""What a TorchServe request row holds, and the JSON answers the handler returns.

A row is a dict: a raw body arrives as "body" (or "data"), a multipart part under its field name, and an
application/json body already parsed into a dict under "body". Query strings reach the handler only through
/models/{name}/invoke: TorchServe drops them on /predictions, so `k` and `output` can also come as form fields,
JSON fields, or the headers X-Top-K and X-Output.
"""
import base64
import binascii
from dataclasses import dataclass

from .images import InputError, decode_image

OUTPUTS = ("similar", "embedding")
PARAMETERS = ("k", "output")
HEADERS = {"x-top-k": "k", "x-output": "output"}


@dataclass
class Query:
    image: object  # RGB PIL image, or JPEG bytes left for a batch decoder (visual_search.runtime)
    k: int
    output: str


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _image_bytes(row):
    body = row.get("body", row.get("data"))
    if isinstance(body, dict):  # application/json
        encoded = body.get("image")
        if not isinstance(encoded, str):
            raise InputError('JSON body needs "image": the image bytes in base64', label="bad_body")
        try:
            return base64.b64decode(encoded, validate=True), body
        except (binascii.Error, ValueError):
            raise InputError('"image" is not valid base64', label="bad_body") from None
    if isinstance(body, (bytes, bytearray)):
        return bytes(body), {}
    if isinstance(body, str):
        raise InputError("text body: send the image bytes, a multipart file, or JSON {\"image\": base64}", 415,
                         label="bad_body")
    files = [v for key, v in row.items() if key not in PARAMETERS and isinstance(v, (bytes, bytearray))]
    if len(files) > 1:
        raise InputError(f"{len(files)} files in one request: send one image per request", label="bad_body")
    if files:
        return bytes(files[0]), {}
    if body is None:
        raise InputError("empty request: send the image bytes as the body or as a multipart file", label="empty")
    raise InputError(f"unsupported body of type {type(body).__name__}", label="bad_body")


def parse_query(row, headers, default_k, max_k, decode=decode_image):
    """A request row (and its HTTP headers) to a Query; raises InputError with the reason for the client."""
    data, json_params = _image_bytes(row)
    params = {HEADERS[name.lower()]: value for name, value in headers.items() if name.lower() in HEADERS}
    params.update({k: _text(row[k]) for k in PARAMETERS if k in row})
    params.update({k: json_params[k] for k in PARAMETERS if k in json_params})
    output = str(params.get("output", "similar")).lower()
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {', '.join(OUTPUTS)}, not {output!r}", label="bad_parameter")
    try:
        k = int(params.get("k", default_k))
    except (TypeError, ValueError):
        raise InputError(f"k must be an integer, not {params.get('k')!r}", label="bad_parameter") from None
    if not 1 <= k <= max_k:
        raise InputError(f"k must be between 1 and {max_k}, not {k}", label="bad_parameter")
    return Query(image=decode(data), k=k, output=output)


def error_answer(error):
    return {"error": error.reason, "status": error.status}
