"""TorchServe handler: an uploaded product photo -> its category and the most similar catalogue items.

The archive carries the visual_search package, model.pt and manifest.json (preprocessing, runtime settings, the
catalogue it expects), and the catalogue folder when it is bundled. A large catalogue stays outside the archive:
model-config.yaml's handler.catalogue_dir names it, and every worker maps the same files read-only. Everything is
checked at load time; any mismatch fails the load with a message naming it.

Every row of a batch is answered on its own terms. TorchServe's BaseHandler.handle picks one path (predict,
explain, describe) from the first row for the whole batch; this handler looks at each row instead, so an
/explanations request gets its own 400 and never changes what the other requests in its batch get.
"""
import logging
import os
import time
from http import HTTPStatus

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from visual_search.bundle import load_bundle
from visual_search.catalogue_filters import UnknownListingError
from visual_search.catalogue_store import SearchRequest
from visual_search.handler_metrics import record_batch, record_rejection, timed
from visual_search.images import InputError
from visual_search.runtime import CoreShare, Runtime, RuntimeSettings
from visual_search.service_io import Limits, compact_json, error_answer

log = logging.getLogger(__name__)
JSON = "application/json"
EMBEDDING_DECIMALS = 9  # under 1e-9 from the model's float32 values; about 25 KB of JSON for 2048 floats


def no_explanations():
    return InputError("explanations are not available for this model: POST the photo to /predictions/<model>",
                      label="explain")


def search_error(error):
    """A catalogue's refusal of one request as that request's InputError: 404 for an unknown listing id, 400 for a
    filter that matches nothing or names an unknown category."""
    if isinstance(error, UnknownListingError):
        return InputError(str(error), 404, label="unknown_listing")
    if isinstance(error, ValueError):
        return InputError(str(error), 400, label="bad_filter")
    raise error


class VisualSearchHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        config = context.model_yaml_config or {}
        settings = config.get("handler", {})
        self.cores = CoreShare(settings.get("threads"))
        # raises, and the load fails, on any mismatch
        self.bundle = load_bundle(properties["model_dir"], catalogue_dir=settings.get("catalogue_dir"))
        self.catalogue = self.bundle.catalogue
        gpu_id = properties.get("gpu_id")
        use_cuda = torch.cuda.is_available() and gpu_id is not None
        self.device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        runtime, dropped = RuntimeSettings.from_dict(self.bundle.manifest["runtime"]).for_device(self.device)
        for name, why in dropped.items():
            log.info("runtime setting %s not applied: %s", name, why)
        self.runtime = Runtime(self.bundle, self.device, runtime, warmup_batch=int(config.get("batchSize", 1)))
        self.limits = Limits(default_k=int(settings.get("default_k", 4)),
                             max_k=min(int(settings.get("max_k", 100)), self.catalogue.count))
        model = context.manifest.get("model", {})
        self.model_name, self.version = model.get("modelName"), model.get("modelVersion")
        self.categories = np.array(self.bundle.categories)
        self.initialized = True
        log.info("loaded %s v%s: catalogue %s (%d items, %s) on %s, runtime %s, %d threads (warm-up %.1f s)",
                 self.model_name, self.version, self.catalogue.folder, self.catalogue.count,
                 self.catalogue.manifest["factory"], self.device, self.runtime.settings.to_dict(), self.cores.threads,
                 self.runtime.warmup_seconds)

    def _metrics(self):
        return getattr(self.context, "metrics", None)

    def handle(self, data, context):
        """One answer per row, as compact JSON bytes, whatever the other rows of the batch ask for."""
        start = time.perf_counter()
        self.context = context
        self.cores.update()
        answers = self.postprocess(self.inference(self.preprocess(data)))
        if self._metrics() is not None:
            self._metrics().add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return answers

    def _row_kind(self, idx):
        """"predict", or what TorchServe's frontend marked the row as: "explain" (/explanations) or "describe"."""
        for kind in ("explain", "describe"):
            if self.context.get_request_header(idx, kind) == "True":
                return kind
        return "predict"

    def preprocess(self, data):
        """(kinds, queries, errors, batch): one entry per row; `batch` stacks the tensors of the valid queries."""
        with timed(self._metrics(), "Preprocess"):
            kinds = [self._row_kind(i) for i in range(len(data))]
            headers = [self.context.get_all_request_header(i) for i in range(len(data))]
            skip = {i for i, kind in enumerate(kinds) if kind != "predict"}
            queries, errors, batch = self.runtime.prepare(data, headers, self.limits, skip)
            errors = [no_explanations() if kind == "explain" else error for kind, error in zip(kinds, errors)]
        record_batch(self._metrics(), len(data), errors)
        return kinds, queries, errors, batch

    def inference(self, prepared):
        kinds, queries, errors, batch = prepared
        embeddings = probabilities = None
        if batch is not None:
            with timed(self._metrics(), "Inference"):
                embeddings, probabilities = self.runtime.embed(batch)
        photo_row, requests, rows = 0, [], []
        for idx, query in enumerate(queries):
            if query is None:
                continue
            vector = None
            if query.image is not None:
                query.row, photo_row = photo_row, photo_row + 1
                vector = embeddings[query.row]
            if query.output == "similar":
                requests.append(SearchRequest(k=query.k, vector=vector, listing=query.listing,
                                              categories=query.categories, exclude=query.exclude))
                rows.append(idx)
        found = [None] * len(queries)
        if requests:
            with timed(self._metrics(), "Search"):
                for idx, hits in zip(rows, self.catalogue.answer(requests)):
                    found[idx] = hits
        return kinds, queries, errors, embeddings, probabilities, found

    def postprocess(self, inferred):
        kinds, queries, errors, embeddings, probabilities, found = inferred
        answers = []
        for idx, (kind, query, error) in enumerate(zip(kinds, queries, errors)):
            if error is None and isinstance(found[idx], Exception):
                error = search_error(found[idx])
                record_rejection(self._metrics(), error)
            if error is not None:
                # The status line gets the standard phrase only: TorchServe 0.12 frames the phrase by its length in
                # characters but sends its UTF-8 bytes, so a client's text there would corrupt the worker's reply.
                self.context.set_response_status(error.status, HTTPStatus(error.status).phrase, idx)
                answer = error_answer(error)
            elif kind == "describe":
                answer = self._description()
            elif query.output == "embedding":
                answer = self._embedding_answer(embeddings[query.row])
            else:
                answer = self._similar_answer(found[idx], None if query.image is None else probabilities[query.row])
            self.context.set_response_content_type(idx, JSON)
            answers.append(compact_json(answer))
        return answers

    def _header(self):
        return {"model": self.model_name, "model_version": self.version}

    def _embedding_answer(self, embedding):
        values = np.round(embedding.astype(np.float64), EMBEDDING_DECIMALS).tolist()
        return {**self._header(), "dim": int(embedding.shape[0]), "normalized": self.bundle.normalize,
                "embedding": values}

    def _similar_answer(self, hits, probabilities):
        """By photo: the predicted category and its confidence; by listing: the listing's own category."""
        if probabilities is None:
            category, confidence = hits.listing.category, None
        else:
            best = int(probabilities.argmax())
            category, confidence = str(self.categories[best]), round(float(probabilities[best]), 6)
        answer = {**self._header(), "category": category, "confidence": confidence, "k": hits.k,
                  "neighbours": [{**n.to_dict(), "distance": round(n.distance, 6)} for n in hits.neighbours]}
        if hits.listing is not None:
            item = hits.listing
            answer["listing"] = {"id": item.id, "category": item.category, "image": item.image}
        return answer

    def _description(self):
        """What `GET /models/<name>?customized=true` shows as customizedMetadata."""
        manifest = self.bundle.manifest
        catalogue = self.catalogue.manifest
        return {**self._header(), "categories": list(self.bundle.categories), "items": catalogue["count"],
                "catalogue": {"uid": catalogue["uid"], "version": catalogue.get("version"), "items": catalogue["count"],
                              "categories": catalogue["categories"], "profile": catalogue["profile"],
                              "factory": catalogue["factory"], "search": catalogue["search"],
                              "bundled": manifest["catalogue"].get("bundled", False)},
                "embedding_dim": manifest["embedding_dim"],
                "preprocess": manifest["preprocess"], "runtime": self.runtime.settings.to_dict(),
                "default_k": self.limits.default_k, "max_k": self.limits.max_k, "threads": self.cores.threads,
                "workers_on_host": self.cores.workers, "pid": os.getpid()}
