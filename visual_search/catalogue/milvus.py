"""A Milvus collection as the catalogue engine, behind the same answer() as a catalogue folder: the same Hits,
filters as Milvus expressions, exclude, search by listing (the stored vector fetched by id), exactly k whenever the
filtered set holds k, exact squared L2 distances. The collection's identity (uid, count, dimension, normalisation,
categories, index and search parameters) is a JSON property of the collection, checked against an archive's
reference. pymilvus is imported on first use, so catalogue folders never need it. docs/milvus.md."""
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .. import EMBEDDING_DIM
from ..errors import CatalogueError, CatalogueUnavailable, FilterError, InputError, UnknownListingError
from ..items import Item
from .search import Hits, Neighbour, SearchRequest, queries_of

IDENTITY_PROPERTY = "visual_search.identity"  # the collection property holding the identity JSON
IDENTITY_KEYS = ("uid", "count", "dim", "normalized")  # what an archive pins
ID_LENGTH, CATEGORY_LENGTH, IMAGE_LENGTH = 512, 256, 2048  # VARCHAR max_length of the scalar fields
MAX_LIMIT = 16_384  # Milvus's largest topk
EXACT_FETCH_UP_TO = 4096  # a filtered set this small is fetched and ranked exactly when an index stays short
DEFAULT_TIMEOUT = 10.0  # s per Milvus call; keep it under the archive's responseTimeout
# gRPC keepalive pings only during calls, one per 10 minutes: over a server's default minimum interval (5 minutes,
# Milvus Lite's too). pymilvus's own (every 10 s, idle too) gets connections closed with "too many pings", and a
# long call (an index build) then retried by pymilvus; every call has its own deadline anyway.
KEEPALIVE = {"grpc.keepalive_time_ms": 600_000, "grpc.keepalive_permit_without_calls": 0}
NOT_LOADED = 101  # the MilvusException code of a search on a released collection
TOKEN_ENV = "MILVUS_TOKEN"
URI_ENV = "VISUAL_SEARCH_MILVUS_URI"  # overrides the archive's uri (a Deployment points its pods here)


@dataclass(frozen=True)
class MilvusSettings:
    """Where the collection is and how to reach it: the handler's `milvus` section of model-config.yaml. The
    token comes from `token_file` or the env var `token_env`, never from the archive."""
    uri: str
    collection: str
    token_file: str = None
    token_env: str = TOKEN_ENV
    timeout: float = DEFAULT_TIMEOUT
    consistency: str = "Strong"

    @classmethod
    def from_dict(cls, values):
        """From model-config.yaml's handler.milvus; $VISUAL_SEARCH_MILVUS_URI, where set, overrides the uri."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(SETTING_NAMES))
        if unknown:
            raise CatalogueError(f"unknown milvus settings {', '.join(unknown)}; known: {', '.join(SETTING_NAMES)}")
        values["uri"] = os.environ.get(URI_ENV) or values.get("uri")
        if not values["uri"] or not values.get("collection"):
            raise CatalogueError("the milvus setting needs uri and collection")
        if "timeout" in values:
            values["timeout"] = float(values["timeout"])
        return cls(**values)

    def to_dict(self):
        """What an archive's model-config.yaml records (no token)."""
        values = {"uri": self.uri, "collection": self.collection, "timeout": self.timeout,
                  "consistency": self.consistency, "token_env": self.token_env}
        if self.token_file:
            values["token_file"] = self.token_file
        return values

    def token(self):
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        return os.environ.get(self.token_env, "")

    def where(self):
        return f"Milvus {self.uri} collection {self.collection}"


SETTING_NAMES = tuple(f.name for f in fields(MilvusSettings))


def connect(settings):
    """A MilvusClient for `settings`; CatalogueUnavailable when the server does not answer."""
    from pymilvus import MilvusClient  # noqa: PLC0415 (pymilvus only for this engine)

    try:
        # dedicated: pymilvus shares one connection per address and token, made with the options of the first
        # client in the process; this one gets its own, with these options
        return MilvusClient(uri=settings.uri, token=settings.token(), timeout=settings.timeout,
                            grpc_options=KEEPALIVE, dedicated=True)
    except Exception as error:  # noqa: BLE001 (pymilvus raises MilvusException or gRPC errors)
        raise unavailable(settings, error) from None


def unavailable(settings, error):
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return CatalogueUnavailable(f"the catalogue engine ({settings.where()}) did not answer within "
                                f"{settings.timeout:g} s: {first}")


def read_identity(client, settings):
    """The identity JSON of the collection; CatalogueError when it is missing or not one of ours."""
    if not client.has_collection(settings.collection, timeout=settings.timeout):
        raise CatalogueError(f"{settings.where()} does not exist")
    described = client.describe_collection(settings.collection, timeout=settings.timeout)
    raw = (described.get("properties") or {}).get(IDENTITY_PROPERTY)
    if raw is None:
        raise CatalogueError(f"{settings.where()} has no {IDENTITY_PROPERTY} property: publish it with "
                             f"python -m training.publish_milvus")
    return json.loads(raw)


def collection_reference(settings, identity):
    """What an archive records about the collection it expects (in its manifest's catalogue section)."""
    return {"engine": "milvus", "collection": settings.collection, "bundled": False,
            **{key: identity[key] for key in IDENTITY_KEYS}}


def open_collection(settings, expect=None):
    """The MilvusCatalogue of `settings`, loaded; raises CatalogueError naming every field where the collection
    differs from `expect` (an archive's reference), CatalogueUnavailable when Milvus does not answer."""
    client = connect(settings)
    try:
        identity = read_identity(client, settings)
        if expect is not None:
            differ = [f"{key} {identity.get(key)!r}, expected {expect[key]!r}" for key in IDENTITY_KEYS
                      if key in expect and identity.get(key) != expect[key]]
            if differ:
                raise CatalogueError(f"{settings.where()} is not the catalogue this archive was built for: "
                                     f"{'; '.join(differ)}")
        if identity["dim"] != EMBEDDING_DIM:
            raise CatalogueError(f"{settings.where()}: vectors of dimension {identity['dim']}, expected "
                                 f"{EMBEDDING_DIM}")
        client.load_collection(settings.collection, timeout=settings.timeout)
    except CatalogueError:
        client.close()
        raise
    except Exception as error:  # noqa: BLE001
        client.close()
        raise unavailable(settings, error) from None
    return MilvusCatalogue(settings, client, identity)


def literal(text):
    """A Milvus expression string literal: double quotes, with backslash and quote escaped."""
    return json.dumps(str(text), ensure_ascii=False)


def category_filter(categories=(), exclude=()):
    """The Milvus filter expression of a category filter and excluded ids ("" for none)."""
    parts = []
    if categories:
        parts.append(f"category in [{', '.join(map(literal, categories))}]")
    if exclude:
        parts.append(f"id not in [{', '.join(map(literal, exclude))}]")
    return " and ".join(parts)


class MilvusCatalogue:
    """A published Milvus collection, opened for serving. Live changes are upserts and deletes in the collection
    itself (serving.listings), seen by every search at the settings' consistency level."""

    overlay = None

    def __init__(self, settings, client, identity):
        self.settings, self.client, self.identity = settings, client, identity
        self.folder = settings.where()  # what logs and descriptions show where a folder would be
        self.categories = list(identity["categories"])
        self.category_codes = {name: code for code, name in enumerate(self.categories)}
        self.count = int(identity["count"])
        self.search_params = dict(identity.get("search") or {})
        self.k_factor = int(self.search_params.get("k_factor", 1))
        self.exact = identity["index"]["index_type"] == "FLAT"
        self.manifest = {"uid": identity["uid"], "version": identity.get("version"), "count": self.count,
                         "categories": self.categories, "profile": identity.get("profile"),
                         "factory": identity["index"]["index_type"], "search": self.search_params,
                         "engine": "milvus", "collection": settings.collection, "runtime": identity.get("runtime")}

    @property
    def uid(self):
        return self.identity["uid"]

    @property
    def normalized(self):
        return bool(self.identity["normalized"])

    @property
    def live_count(self):
        return self.count_matching("")

    def close(self):
        self.client.close()

    # ------------------------------------------------------------------ calls to Milvus

    def _call(self, method, *args, **kwargs):
        """A client call with the settings' timeout; CatalogueUnavailable (503) for any failure of the call. A
        collection released meanwhile (a restarted server) is loaded again and the call repeated once."""
        call = getattr(self.client, method)
        try:
            try:
                return call(self.settings.collection, *args, timeout=self.settings.timeout, **kwargs)
            except Exception as error:  # noqa: BLE001
                if getattr(error, "code", None) != NOT_LOADED:
                    raise
                self.client.load_collection(self.settings.collection, timeout=self.settings.timeout)
                return call(self.settings.collection, *args, timeout=self.settings.timeout, **kwargs)
        except Exception as error:  # noqa: BLE001 (MilvusException, gRPC errors, timeouts)
            raise unavailable(self.settings, error) from None

    def count_matching(self, expression):
        rows = self._call("query", filter=expression, output_fields=["count(*)"],
                          consistency_level=self.settings.consistency)
        return int(rows[0]["count(*)"])

    def rows(self, ids, vectors=False):
        """{id: row} of the ids in the collection (row: id, category, image and, with `vectors`, vector)."""
        if not ids:
            return {}
        fields = ["id", "category", "image", *(["vector"] if vectors else [])]
        return {row["id"]: row for row in self._call("get", ids=list(ids), output_fields=fields,
                                                      consistency_level=self.settings.consistency)}

    def stored_vectors(self, ids):
        """float32 [len(ids), dim]: the stored vectors of listings in the collection, in the order of `ids`."""
        rows = self.rows(ids, vectors=True)
        return np.asarray([rows[item_id]["vector"] for item_id in ids], dtype=np.float32)

    # ------------------------------------------------------------------ live changes

    def upsert(self, item_id, category, image, vector):
        """Writes one listing's row (serving.listings adds listings through this)."""
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (EMBEDDING_DIM,) or not np.isfinite(vector).all():
            raise InputError(f"a listing's vector must be {EMBEDDING_DIM} finite floats")
        self._call("upsert", [{"id": item_id, "category": category, "image": image, "vector": vector.tolist()}])

    def delete(self, item_id):
        self._call("delete", ids=[item_id])

    # ------------------------------------------------------------------ lookups

    def listing(self, item_id):
        """(vector, Item) of a listing; UnknownListingError when it is not in the collection."""
        row = self.rows([item_id], vectors=True).get(item_id)
        if row is None:
            raise UnknownListingError(f"unknown listing id {item_id!r}: not in this catalogue")
        return np.asarray(row["vector"], dtype=np.float32), Item(row["id"], row["category"], row["image"])

    def contains(self, item_id):
        return bool(self.rows([item_id]))

    def vector(self, item_id):
        return self.listing(item_id)[0]

    def check_categories(self, categories):
        unknown = [c for c in categories if c not in self.category_codes]
        if unknown:
            raise FilterError(f"unknown category {unknown[0]!r}; this catalogue has: {', '.join(self.categories)}")

    # ------------------------------------------------------------------ searching

    def search(self, queries, k, categories=(), exclude=()):
        """One Hits per query row, nearest first, among the listings the filter lets through."""
        results = self.answer([SearchRequest(k=k, vector=row, categories=tuple(categories), exclude=tuple(exclude))
                               for row in queries_of(queries)])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def answer(self, requests):
        """A batch of SearchRequests -> one Hits or VisualSearchError per request, in order; requests that share
        a filter are searched together in one call."""
        results, groups = [None] * len(requests), {}
        for i, request in enumerate(requests):
            try:
                vector, exclude, item = request.vector, tuple(request.exclude or ()), None
                if request.k < 1:
                    raise InputError(f"k must be at least 1, not {request.k}")
                if request.listing is not None:
                    vector, item = self.listing(request.listing)
                    exclude = exclude + (request.listing,)
                elif vector is None:
                    raise InputError("a search request needs a vector or a listing id")
                categories = tuple(dict.fromkeys(request.categories or ()))
                self.check_categories(categories)
                groups.setdefault((categories, tuple(sorted(set(exclude)))), []).append((i, vector, request.k, item))
            except (InputError, CatalogueUnavailable) as error:
                results[i] = error
        for (categories, exclude), members in groups.items():
            try:
                found = self._search_group(queries_of([m[1] for m in members]), max(m[2] for m in members),
                                           categories, exclude)
            except (InputError, CatalogueUnavailable) as error:
                for i, *_ in members:
                    results[i] = error
                continue
            for (i, _, own_k, item), (neighbours, available) in zip(members, found):
                results[i] = Hits(neighbours[:own_k], own_k, available, item)
        return results

    def _search_group(self, queries, k, categories, exclude):
        """[(neighbours, available)] per query: min(k, available) neighbours, nearest first, exact distances."""
        expression = category_filter(categories, exclude)
        rerank = not self.exact
        limit = min(MAX_LIMIT, k * self.k_factor)
        rows = self._search(queries, limit, expression, self.search_params, rerank)
        available = None
        answers = []
        for query, hits in zip(queries, rows):
            if len(hits) < k:  # fewer than k found: the filtered set is that small, or the index stopped short
                if available is None:
                    available = self.count_matching(expression)
                    if available == 0:
                        raise self.no_match(categories, exclude)
                if len(hits) < min(k, available) and not self.exact:
                    hits = self._complete(query, min(MAX_LIMIT, max(limit, available)), expression, available)
            neighbours = self._neighbours(query, hits, rerank)[:k]
            answers.append((neighbours, available if available is not None else max(k, len(hits))))
        return answers

    def _search(self, queries, limit, expression, search_params, with_vectors):
        fields = ["id", "category", "image", *(["vector"] if with_vectors else [])]
        found = self._call("search", data=[q.tolist() for q in queries], anns_field="vector", limit=limit,
                           filter=expression, output_fields=fields,
                           search_params={"metric_type": "L2", "params": milvus_search_params(search_params)},
                           consistency_level=self.settings.consistency)
        return [[hit["entity"] | {"distance": hit["distance"]} for hit in row] for row in found]

    def _complete(self, query, limit, expression, available):
        """The hits of one query that an index answered short: wider, then (small sets) fetched and ranked."""
        wide = dict(self.search_params)
        if "nprobe" in wide:
            wide["nprobe"] = int(self.identity["index"]["params"].get("nlist", wide["nprobe"]))
        if "ef" in wide:
            wide["ef"] = max(int(wide["ef"]), limit)
        hits = self._search(query[None, :], limit, expression, wide, True)[0]
        if len(hits) >= min(limit, available) or available > EXACT_FETCH_UP_TO:
            return hits
        return self._call("query", filter=expression, limit=available,
                          output_fields=["id", "category", "image", "vector"],
                          consistency_level=self.settings.consistency)

    def _neighbours(self, query, hits, rerank):
        """Neighbours nearest first: Milvus's distances (squared L2) for FLAT, else exact ones from the vectors."""
        if rerank and hits:
            vectors = np.asarray([hit["vector"] for hit in hits], dtype=np.float32)
            diff = vectors - query
            distances = np.einsum("ij,ij->i", diff, diff)
        else:
            distances = np.asarray([hit["distance"] for hit in hits], dtype=np.float32)
        order = np.argsort(distances, kind="stable")
        return [Neighbour(hits[i]["id"], hits[i]["category"], hits[i]["image"], float(distances[i])) for i in order]

    def no_match(self, categories, exclude):
        from .store import no_match  # noqa: PLC0415 (the same message as a catalogue folder's)

        return no_match(categories, exclude, self.count_matching(category_filter(categories)))


def milvus_search_params(search_params):
    """The Milvus search parameters among ours (nprobe for IVF, ef for HNSW, refine_k for refined codes)."""
    return {key: search_params[key] for key in ("nprobe", "ef", "refine_k") if key in search_params}
