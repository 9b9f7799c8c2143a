"""A TorchServe request row to a Query: where the photo is, and each parameter of PARAMETERS read from its header,
form field, query-string parameter or JSON field (later sources override earlier ones), checked and typed; adding a
parameter is one entry in that table. Refusals are InputErrors with the reason for the client."""
import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from .errors import InputError
from .images import decode_image

FORM_ENCODED = "application/x-www-form-urlencoded"
IMAGE_FIELD = "image"
OUTPUTS = ("similar", "embedding")
SEND_AN_IMAGE = ("send the photo as the raw body with its content type (curl -T photo.jpg, or "
                 "-H 'Content-Type: image/jpeg' --data-binary @photo.jpg), as a multipart file field "
                 "(-F image=@photo.jpg), or as JSON {\"image\": \"<base64>\"}")


@dataclass(frozen=True)
class Limits:
    """What the archive allows: the k used when none is asked for, and the largest k."""
    default_k: int = 4
    max_k: int = 100


def bad_parameter(message):
    return InputError(message, label="bad_parameter")


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
SHOWN_CHARACTERS = 60


def shown(value):
    """`value` as a reason quotes it: repr, cut to a few dozen characters."""
    if isinstance(value, str) and len(value) > SHOWN_CHARACTERS:
        return f"{value[:SHOWN_CHARACTERS]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= 2 * SHOWN_CHARACTERS else f"{text[:2 * SHOWN_CHARACTERS]}... (cut)"


def header_text(value):
    """A header value as the client wrote it. TorchServe hands headers over as ISO-8859-1 characters, one per byte
    on the wire; a value whose bytes are UTF-8 is decoded as UTF-8, anything else is kept as it came."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def check_plain(name, value):
    """Refuses text with control characters or lone surrogates (no id, category or option holds them)."""
    texts = value if isinstance(value, list) else [value]
    if any(isinstance(text, str) and CONTROL_CHARACTERS.search(text) for text in texts):
        raise bad_parameter(f"{name} holds control characters or invalid text: {shown(value)}")
    return value


def read_output(value, limits, text):
    if not isinstance(value, str) or value.strip().lower() not in OUTPUTS:
        raise bad_parameter(f"output must be one of {', '.join(OUTPUTS)}, not {shown(value)}")
    return value.strip().lower()


def read_k(value, limits, text):
    if text and isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,9}\s*", value, re.ASCII):
        value = int(value)
    elif text or type(value) is not int:  # JSON: a real integer; 2.9, true and "3" are refused, not converted
        raise bad_parameter(f"k must be an integer, not {shown(value)}")
    if not 1 <= value <= limits.max_k:
        raise bad_parameter(f"k must be between 1 and {limits.max_k}, not {value}")
    return value


MAX_ID_LENGTH = 256
MAX_NAMES = {"category": 100, "exclude": 1000}


def read_listing(value, limits, text):
    if not isinstance(value, str) or not value.strip() or len(value.strip()) > MAX_ID_LENGTH:
        raise bad_parameter(f"listing must be a catalogue id (a non-empty string of at most {MAX_ID_LENGTH} "
                            f"characters), not {shown(value)}")
    return value.strip()


def split_names(text):
    """Comma-separated names; a comma or a percent sign inside a name is written %2C or %25."""
    return [unquote(part, errors="strict") if "%" in part else part for part in text.split(",")]


def names_reader(name):
    """Reads a list of names: comma-separated text (split_names), or JSON as one string or a list of strings."""
    def read(value, limits, text):
        if isinstance(value, str):
            try:
                value = split_names(value) if text else [value]
            except UnicodeDecodeError:
                raise bad_parameter(f"{name}: a %-escape that is not UTF-8 in {shown(value)}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad_parameter(f"{name} must be a string or a list of strings, not {shown(value)}")
        check_plain(name, value)
        names = tuple(dict.fromkeys(v.strip() for v in value if v.strip()))
        if not names or len(names) > MAX_NAMES[name] or max(map(len, names)) > MAX_ID_LENGTH:
            raise bad_parameter(f"{name} must name 1 to {MAX_NAMES[name]} values of at most {MAX_ID_LENGTH} "
                                f"characters each, not {shown(value)}")
        return names
    return read


FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def flag_reader(name):
    """Reads a yes/no parameter: true/false, 1/0, yes/no or on/off as text; a JSON true or false."""
    def read(value, limits, text):
        if text and isinstance(value, str) and value.strip().lower() in FLAGS:
            return FLAGS[value.strip().lower()]
        if not text and type(value) is bool:
            return value
        raise bad_parameter(f"{name} must be true or false, not {shown(value)}")
    return read


MAX_THRESHOLD = 4.0  # the largest squared L2 distance between unit-length embeddings
NUMBER = re.compile(r"\s*[+-]?[0-9]*\.?[0-9]+(e[+-]?[0-9]+)?\s*", re.IGNORECASE | re.ASCII)


def read_threshold(value, limits, text):
    if text and isinstance(value, str) and NUMBER.fullmatch(value):
        value = float(value)
    elif text or type(value) not in (int, float):
        raise bad_parameter(f"duplicate_threshold must be a number, not {shown(value)}")
    if not 0.0 < value <= MAX_THRESHOLD:
        raise bad_parameter(f"duplicate_threshold must be a squared L2 distance above 0 and at most {MAX_THRESHOLD:g}, "
                            f"not {shown(value)}")
    return float(value)


def similar_only(params):
    return params["output"] == "similar"


@dataclass(frozen=True)
class Parameter:
    header: str
    read: object  # (value, Limits, text) -> the typed value; text: a str from a header, form field or query
    #               string, else a JSON value
    default: object  # Limits -> the value when the request gives none
    applies: object = lambda params: True  # whether it is read at all, given the parameters read before it


PARAMETERS = {  # read in this order
    "output": Parameter("X-Output", read_output, lambda limits: "similar"),
    "k": Parameter("X-Top-K", read_k, lambda limits: limits.default_k, applies=similar_only),
    "category": Parameter("X-Category", names_reader("category"), lambda limits: (), applies=similar_only),
    "exclude": Parameter("X-Exclude", names_reader("exclude"), lambda limits: (), applies=similar_only),
    "listing": Parameter("X-Listing", read_listing, lambda limits: None),
    "duplicates": Parameter("X-Duplicates", flag_reader("duplicates"), lambda limits: False, applies=similar_only),
    "diverse": Parameter("X-Diverse", flag_reader("diverse"), lambda limits: False, applies=similar_only),
    "duplicate_threshold": Parameter("X-Duplicate-Threshold", read_threshold, lambda limits: None,
                                     applies=similar_only),
}


@dataclass
class Query:
    image: object  # RGB PIL image, a Jpeg left for the batch decoder (visual_search.runtime),
    #                or None when the request searches by a listing id
    params: dict = field(default_factory=dict)

    @property
    def k(self):
        return self.params.get("k")

    @property
    def output(self):
        return self.params["output"]

    @property
    def listing(self):
        return self.params.get("listing")

    @property
    def categories(self):
        return self.params.get("category", ())

    @property
    def exclude(self):
        return self.params.get("exclude", ())


def _text(value):
    return bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


def split_headers(headers):
    """(HTTP headers with lower-case names, {part name: its content type}) from one row's request headers."""
    http, parts = {}, {}
    for name, value in (headers or {}).items():
        if isinstance(value, dict):
            parts[name] = value.get("content-type") or ""
        else:
            http[name.lower()] = header_text(value)
    return http, parts


def mime_type(http):
    return str(http.get("content-type", "")).split(";")[0].strip().lower()


def _json_body(body):
    if not isinstance(body, dict):
        raise InputError('a JSON body must be an object: {"image": "<base64>", ...}', label="bad_body")
    if IMAGE_FIELD not in body:
        return None  # no photo: the request may name a listing instead (parse_query decides)
    encoded = body.get(IMAGE_FIELD)
    if not isinstance(encoded, str):
        raise InputError('JSON body needs "image": the image bytes in base64', label="bad_body")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InputError('"image" is not valid base64', label="bad_body") from None


def _raw_body(body, content_type):
    if isinstance(body, (dict, list)):
        return _json_body(body)
    if isinstance(body, str):
        raise InputError(f"a text body ({content_type or 'text'}) is not an image: {SEND_AN_IMAGE}", 415,
                         label="bad_body")
    if content_type == "application/json":  # TorchServe forwards JSON it cannot parse as bytes
        raise InputError("the body is not valid JSON", label="bad_body")
    return bytes(body) or None


def image_and_fields(row, content_type, part_types):
    """(image bytes or None, {field: value}) of a row: the raw body or the image part, and the other fields."""
    fields = {name: value for name, value in row.items() if name not in ("body", "data")}
    if content_type == FORM_ENCODED and set(fields) - set(PARAMETERS):
        raise InputError("the body was sent form-encoded (application/x-www-form-urlencoded, curl's default for "
                         f"--data-binary), which mangles image bytes: {SEND_AN_IMAGE}", 415, label="bad_body")
    body = row.get("body", row.get("data"))
    if body is not None:
        return _raw_body(body, content_type), fields
    files = [name for name in fields if name not in PARAMETERS and part_types.get(name)]
    if len(files) > 1:
        raise InputError(f"{len(files)} files in one request ({', '.join(sorted(files))}): send one image per "
                         f'request, in the field "{IMAGE_FIELD}"', label="bad_body")
    if IMAGE_FIELD in fields:
        image = fields.pop(IMAGE_FIELD)
        if part_types.get(IMAGE_FIELD) == "application/json" or isinstance(image, (dict, list)):
            return _json_body(image), fields
        if not isinstance(image, (bytes, bytearray)):
            raise InputError(f'the "{IMAGE_FIELD}" field is not an image file: {SEND_AN_IMAGE}', label="bad_body")
        return bytes(image), fields
    if files:
        return bytes(fields.pop(files[0])), fields
    return None, fields


def read_parameters(http, fields, json_fields, limits):
    """The typed value of every parameter that applies: JSON field over form field or query over header."""
    params = {}
    for name, parameter in PARAMETERS.items():
        if not parameter.applies(params):
            continue
        value, text = http.get(parameter.header.lower()), True
        if name in fields:
            value = _text(fields[name])
        if name in json_fields:
            value, text = json_fields[name], False
        params[name] = parameter.default(limits) if value is None else \
            parameter.read(check_plain(name, value), limits, text)
    return params


def parse_query(row, headers, limits, decode=decode_image):
    """A request row and its headers to a Query; raises InputError with the reason for the client."""
    http, part_types = split_headers(headers)
    data, fields = image_and_fields(row, mime_type(http), part_types)
    body = row.get("body", row.get("data"))
    params = read_parameters(http, fields, body if isinstance(body, dict) else {}, limits)
    if params["listing"] is not None:
        if data is not None:
            raise bad_parameter("send a photo or a listing id to search by, not both")
        if params["output"] != "similar":
            raise bad_parameter("a listing can only be searched by (output=similar); send a photo for an embedding")
        return Query(image=None, params=params)
    if data is None and isinstance(body, dict):
        raise InputError('JSON body needs "image": the image bytes in base64, or "listing": a catalogue id to '
                         'search by', label="empty")
    if data is None:
        raise InputError(f"no image in the request: {SEND_AN_IMAGE}, or name a catalogue id to search by "
                         f"(X-Listing header, or a listing field)", label="empty")
    return Query(image=decode(data), params=params)


def compact_json(answer):
    """An answer as compact JSON bytes, ASCII with \\u escapes (TorchServe would pretty-print a dict)."""
    return json.dumps(answer, separators=(",", ":")).encode("ascii")


def error_answer(error):
    return {"error": error.reason, "status": error.status}
