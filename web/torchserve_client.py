"""Forwarding searches to TorchServe's inference API, with the inference key kept on the server side.

The key comes from TorchServe's key_file.json in its state folder. When TorchServe refuses it (keys expire after
token_expiration_min, 60 minutes by default), the client reads the key file again (someone may have renewed the
key already), and if the file still holds the refused key, it asks for a new one with the API key
(GET <management>/token?type=inference; TorchServe rewrites the key file) and retries once.
"""
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx

from serving.torchserve import DEFAULT_CONFIG, read_properties


class TorchServeUnavailable(RuntimeError):
    """TorchServe cannot be reached, or its keys cannot be read or renewed; the message says which."""


@dataclass(frozen=True)
class Endpoints:
    inference: str
    management: str
    key_file: Path
    model_store: Path

    @classmethod
    def from_state(cls, state_dir):
        """The addresses in the config.properties that serving.serve copied into the state folder (the
        repository's config.properties when there is none yet), and the key file beside it."""
        state_dir = Path(state_dir)
        config = state_dir / "config.properties"
        props = read_properties(config if config.is_file() else DEFAULT_CONFIG)
        return cls(inference=props.get("inference_address", "http://127.0.0.1:8080").rstrip("/"),
                   management=props.get("management_address", "http://127.0.0.1:8081").rstrip("/"),
                   key_file=state_dir / "key_file.json",
                   model_store=Path(props.get("model_store", "model_store")))


def read_key(key_file, name):
    try:
        return json.loads(Path(key_file).read_text())[name]["key"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TorchServeUnavailable(f"cannot read the {name} key from {key_file} ({error.__class__.__name__}): "
                                    f"is TorchServe running from that state folder?") from None


def is_refused_token(response):
    return response.status_code in (400, 401) and (
        "InvalidKeyException" in response.text or "Token Authorization failed" in response.text)


class InferenceKey:
    """The inference key, cached, renewed at most once per refusal even when many requests are refused at once."""

    def __init__(self, endpoints, http):
        self.endpoints, self.http = endpoints, http
        self._key, self._lock = None, threading.Lock()

    def current(self):
        with self._lock:
            if self._key is None:
                self._key = read_key(self.endpoints.key_file, "inference")
            return self._key

    def renew(self, refused):
        """A key to retry with after `refused` was refused."""
        with self._lock:
            if self._key not in (None, refused):
                return self._key  # another request renewed it meanwhile
            latest = read_key(self.endpoints.key_file, "inference")
            if latest != refused:
                self._key = latest  # renewed by someone else (TorchServe rewrote the key file)
                return latest
            api_key = read_key(self.endpoints.key_file, "API")
            try:
                response = self.http.get(f"{self.endpoints.management}/token", params={"type": "inference"},
                                         headers={"Authorization": f"Bearer {api_key}"})
            except httpx.HTTPError as error:
                raise TorchServeUnavailable(f"cannot renew the inference key at {self.endpoints.management}: "
                                            f"{error.__class__.__name__}") from None
            if response.status_code != 200:
                raise TorchServeUnavailable(f"TorchServe refused to renew the inference key "
                                            f"(HTTP {response.status_code}): is {self.endpoints.key_file} the key "
                                            f"file of the TorchServe at {self.endpoints.management}?")
            self._key = read_key(self.endpoints.key_file, "inference")
            return self._key


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


class InferenceClient:
    def __init__(self, endpoints, model, timeout=120.0):
        self.endpoints, self.model = endpoints, model
        self.http = httpx.Client(timeout=timeout)
        self.key = InferenceKey(endpoints, self.http)

    def close(self):
        self.http.close()

    def search(self, version=None, image=None, listing=None, k=None, categories=()):
        """(HTTP status, answer dict) for a similar-items search by photo bytes or by a listing id.

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
            response = self._post(url, self.key.renew(key), request)
        if response.status_code == 200:
            try:
                return 200, response.json()
            except ValueError:
                return 502, {"error": "TorchServe answered with something that is not JSON", "status": 502}
        return response.status_code, {"error": error_of(response), "status": response.status_code}

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
