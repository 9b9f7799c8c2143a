"""TorchServe handler: an uploaded product photo -> its category and the most similar catalogue items.

Everything it needs travels in the archive: the visual_search package, model.pt, catalogue.faiss,
catalogue.csv and manifest.json (preprocessing, index and runtime settings), checked at load time.

Every row of a batch is answered on its own terms. TorchServe's BaseHandler.handle picks one path (predict,
explain, describe) from the first row for the whole batch; this handler looks at each row instead, so an
/explanations request gets its own 400 and never changes what the other requests in its batch get.
"""
import logging
import time

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from visual_search.bundle import load_bundle
from visual_search.handler_metrics import record_batch, timed
from visual_search.images import InputError
from visual_search.runtime import Runtime, RuntimeSettings, share_cores
from visual_search.service_io import Limits, compact_json, error_answer

log = logging.getLogger(__name__)
JSON = "application/json"
EMBEDDING_DECIMALS = 9  # under 1e-9 from the model's float32 values; about 25 KB of JSON for 2048 floats


def no_explanations():
    return InputError("explanations are not available for this model: POST the photo to /predictions/<model>",
                      label="explain")


class VisualSearchHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        config = context.model_yaml_config or {}
        settings = config.get("handler", {})
        workers = max(int(config.get("minWorkers", 1)), int(config.get("maxWorkers", 1)))
        self.threads = share_cores(workers, settings.get("threads"))
        self.bundle = load_bundle(properties["model_dir"])  # raises, and the load fails, on any mismatch
        gpu_id = properties.get("gpu_id")
        use_cuda = torch.cuda.is_available() and gpu_id is not None
        self.device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        runtime, dropped = RuntimeSettings.from_dict(self.bundle.manifest["runtime"]).for_device(self.device)
        for name, why in dropped.items():
            log.info("runtime setting %s not applied: %s", name, why)
        self.runtime = Runtime(self.bundle, self.device, runtime, warmup_batch=int(config.get("batchSize", 1)))
        self.limits = Limits(default_k=int(settings.get("default_k", 4)),
                             max_k=min(int(settings.get("max_k", 100)), len(self.bundle.items)))
        model = context.manifest.get("model", {})
        self.model_name, self.version = model.get("modelName"), model.get("modelVersion")
        self.categories = np.array(self.bundle.categories)
        self.initialized = True
        log.info("loaded %s v%s: %d items, %s on %s, runtime %s, %d threads (warm-up %.1f s)", self.model_name,
                 self.version, len(self.bundle.items), self.bundle.manifest["index_factory"], self.device,
                 self.runtime.settings.to_dict(), self.threads, self.runtime.warmup_seconds)

    def _metrics(self):
        return getattr(self.context, "metrics", None)

    def handle(self, data, context):
        """One answer per row, as compact JSON bytes, whatever the other rows of the batch ask for."""
        start = time.perf_counter()
        self.context = context
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
        if batch is None:
            return kinds, queries, errors, None, None, None
        with timed(self._metrics(), "Inference"):
            embeddings, probabilities = self.runtime.embed(batch)
        k = max((q.k for q in queries if q is not None and q.output == "similar"), default=0)
        with timed(self._metrics(), "Search"):
            found = self.runtime.search(embeddings, k) if k else None
        return kinds, queries, errors, embeddings, probabilities, found

    def postprocess(self, inferred):
        kinds, queries, errors, embeddings, probabilities, found = inferred
        answers, row = [], 0
        for idx, (kind, query, error) in enumerate(zip(kinds, queries, errors)):
            if error is not None:
                self.context.set_response_status(error.status, error.reason, idx)
                answer = error_answer(error)
            elif kind == "describe":
                answer = self._description()
            elif query.output == "embedding":
                answer = self._embedding_answer(embeddings[row])
                row += 1
            else:
                answer = self._similar_answer(query.k, probabilities[row], found[0][row], found[1][row])
                row += 1
            self.context.set_response_content_type(idx, JSON)
            answers.append(compact_json(answer))
        return answers

    def _header(self):
        return {"model": self.model_name, "model_version": self.version}

    def _embedding_answer(self, embedding):
        values = np.round(embedding.astype(np.float64), EMBEDDING_DECIMALS).tolist()
        return {**self._header(), "dim": int(embedding.shape[0]), "normalized": self.bundle.normalize,
                "embedding": values}

    def _similar_answer(self, k, probabilities, distances, positions):
        best = int(probabilities.argmax())
        neighbours = [
            {"id": item.id, "category": item.category, "distance": round(float(distance), 6), "image": item.image}
            for distance, position in zip(distances[:k], positions[:k]) if position >= 0
            for item in (self.bundle.items[position],)
        ]
        return {**self._header(), "category": str(self.categories[best]),
                "confidence": round(float(probabilities[best]), 6), "k": k, "neighbours": neighbours}

    def _description(self):
        """What `GET /models/<name>?customized=true` shows as customizedMetadata."""
        manifest = self.bundle.manifest
        return {**self._header(), "categories": list(self.bundle.categories), "items": len(self.bundle.items),
                "index_factory": manifest["index_factory"], "embedding_dim": manifest["embedding_dim"],
                "preprocess": manifest["preprocess"], "runtime": self.runtime.settings.to_dict(),
                "default_k": self.limits.default_k, "max_k": self.limits.max_k, "threads": self.threads}
