"""Searches forwarded to TorchServe's inference API with the inference key, read from key_file.json and read again
once when TorchServe refuses it; the front renews no key itself (serving.serve keeps them fresh)."""
import io
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx

from serving.torchserve import DEFAULT_CONFIG, ROOT, TorchServeError, is_refused_token, read_key, read_properties


class TorchServeUnavailable(RuntimeError):
    """TorchServe cannot be reached, or its inference key cannot be read or was refused; the message says which."""


@dataclass(frozen=True)
class Endpoints:
    inference: str
    key_file: Path
    model_store: Path

    @classmethod
    def from_state(cls, state_dir):
        """The inference address and model store in the config.properties that TorchServe was started with (the
        copy in the state folder; the repository's config.properties when there is none yet), and the key file
        beside it."""
        state_dir = Path(state_dir)
        config = state_dir / "config.properties"
        props = read_properties(config if config.is_file() else DEFAULT_CONFIG)
        return cls(inference=props.get("inference_address", "http://127.0.0.1:8080").rstrip("/"),
                   key_file=state_dir / "key_file.json",
                   model_store=ROOT / props.get("model_store", "model_store"))  # an absolute path stays as it is


def read_inference_key(key_file):
    """The `inference` entry's key; nothing else of the file is kept."""
    try:
        return read_key(key_file, "inference")
    except TorchServeError as error:
        raise TorchServeUnavailable(str(error)) from None


class InferenceKey:
    """The inference key, cached, read again from the key file at most once per refusal."""

    def __init__(self, key_file):
        self.key_file = Path(key_file)
        self._key, self._lock = None, threading.Lock()

    def current(self):
        with self._lock:
            if self._key is None:
                self._key = read_inference_key(self.key_file)
            return self._key

    def renewed(self, refused):
        """The key to retry with after `refused` was refused: a newer one from the key file."""
        with self._lock:
            if self._key not in (None, refused):
                return self._key  # another request read the newer key meanwhile
            latest = read_inference_key(self.key_file)
            if latest == refused:
                raise TorchServeUnavailable(
                    f"TorchServe refused the inference key in {self.key_file} and the file holds no newer one: the "
                    f"key has expired or was replaced; whoever runs TorchServe renews it (GET <management>/token"
                    f"?type=inference with the API key), and TorchServe rewrites the key file")
            self._key = latest
            return latest


def error_of(response):
    """TorchServe's reason for a refused request: the handler's {"error"} or the frontend's {"message"}."""
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return answer["error"]
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        return answer["message"]
    if response.status_code == 413:
        return "TorchServe refused the request as too large (max_request_size)"
    return response.text.strip()[:300] or f"TorchServe answered HTTP {response.status_code}"


_probe_photo = None


def probe_photo():
    """A small plain PNG: the search that asks TorchServe which version is its default."""
    global _probe_photo
    if _probe_photo is None:
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, format="PNG")
        _probe_photo = buffer.getvalue()
    return _probe_photo


class InferenceClient:
    def __init__(self, endpoints, model, timeout=120.0):
        self.endpoints, self.model = endpoints, model
        self.http = httpx.Client(timeout=timeout)
        self.key = InferenceKey(endpoints.key_file)

    def close(self):
        self.http.close()

    def search(self, version=None, image=None, listing=None, k=None, categories=()):
        """(HTTP status, answer dict) for a similar-items search by photo bytes or by a listing id, sent to
        `version`, or to TorchServe's default version when None.

        A photo goes as a multipart file `image` with form fields; a listing as JSON (no image then)."""
        url = f"{self.endpoints.inference}/predictions/{self.model}" + (f"/{version}" if version else "")
        if listing is not None:
            body = {"listing": listing, **({"k": _int_or_text(k)} if k is not None else {}),
                    **({"category": list(categories)} if categories else {})}
            request = {"json": body}
        else:
            fields = {**({"k": str(k)} if k is not None else {}),
                      **({"category": ",".join(categories)} if categories else {})}
            request = {"files": {"image": ("upload", image, "application/octet-stream")}, "data": fields}
        key = self.key.current()
        response = self._post(url, key, request)
        if is_refused_token(response):
            response = self._post(url, self.key.renewed(key), request)
        if response.status_code == 200:
            try:
                return 200, response.json()
            except ValueError:
                return 502, {"error": "TorchServe answered with something that is not JSON", "status": 502}
        return response.status_code, {"error": error_of(response), "status": response.status_code}

    def default_version(self):
        """The version TorchServe answers /predictions/<model> with: a search with a small plain photo, k = 1."""
        status, answer = self.search(image=probe_photo(), k=1)
        version = answer.get("model_version") if status == 200 else None
        if not isinstance(version, str) or not version:
            raise TorchServeUnavailable(f"cannot learn the default version of {self.model}: TorchServe answered "
                                        f"HTTP {status}: {answer.get('error', 'no model_version in the answer')}")
        return version

    def _post(self, url, key, request):
        try:
            return self.http.post(url, headers={"Authorization": f"Bearer {key}"}, **request)
        except httpx.TimeoutException:
            raise TorchServeUnavailable(f"TorchServe at {self.endpoints.inference} did not answer in time") from None
        except httpx.HTTPError as error:
            raise TorchServeUnavailable(f"TorchServe is unreachable at {self.endpoints.inference} "
                                        f"({error.__class__.__name__}): is it running? (make serve)") from None


def _int_or_text(value):
    """k as a JSON integer when it is one; anything else is left for the handler to refuse with its reason."""
    text = str(value).strip()
    return int(text) if text.isdigit() else value
