"""TorchServe handler: an uploaded product photo -> its category and the most similar catalogue items.

Everything it needs travels in the archive: the visual_search package, model.pt, catalogue.faiss,
catalogue.csv and manifest.json (preprocessing, index and runtime settings), checked at load time.
"""
import logging

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from visual_search.bundle import load_bundle
from visual_search.handler_metrics import record_batch, timed
from visual_search.runtime import Runtime, RuntimeSettings
from visual_search.service_io import error_answer

log = logging.getLogger(__name__)


class VisualSearchHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        self.bundle = load_bundle(properties["model_dir"])  # raises, and the load fails, on any mismatch
        gpu_id = properties.get("gpu_id")
        use_cuda = torch.cuda.is_available() and gpu_id is not None
        self.device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        config = context.model_yaml_config or {}
        settings, dropped = RuntimeSettings.from_dict(self.bundle.manifest["runtime"]).for_device(self.device)
        for name, why in dropped.items():
            log.info("runtime setting %s not applied: %s", name, why)
        self.runtime = Runtime(self.bundle, self.device, settings, warmup_batch=int(config.get("batchSize", 1)))
        settings = config.get("handler", {})
        self.default_k = int(settings.get("default_k", 4))
        self.max_k = min(int(settings.get("max_k", 100)), len(self.bundle.items))
        model = context.manifest.get("model", {})
        self.model_name, self.version = model.get("modelName"), model.get("modelVersion")
        self.categories = np.array(self.bundle.categories)
        self.initialized = True
        log.info("loaded %s v%s: %d items, %s on %s, runtime %s (warm-up %.1f s)", self.model_name, self.version,
                 len(self.bundle.items), self.bundle.manifest["index_factory"], self.device,
                 self.runtime.settings.to_dict(), self.runtime.warmup_seconds)

    def _metrics(self):
        return getattr(self.context, "metrics", None)

    def preprocess(self, data):
        """(queries, errors, batch): one entry per request; `batch` stacks the tensors of the valid ones."""
        with timed(self._metrics(), "Preprocess"):
            headers = [self.context.get_all_request_header(i) if self.context else {} for i in range(len(data))]
            queries, errors, batch = self.runtime.prepare(data, headers, self.default_k, self.max_k)
        record_batch(self._metrics(), len(data), errors)
        return queries, errors, batch

    def inference(self, prepared):
        queries, errors, batch = prepared
        if batch is None:
            return queries, errors, None, None, None
        with timed(self._metrics(), "Inference"):
            embeddings, probabilities = self.runtime.embed(batch)
        k = max((q.k for q in queries if q is not None and q.output == "similar"), default=0)
        with timed(self._metrics(), "Search"):
            found = self.runtime.search(embeddings, k) if k else None
        return queries, errors, embeddings, probabilities, found

    def postprocess(self, inferred):
        queries, errors, embeddings, probabilities, found = inferred
        answers, row = [], 0
        for idx, (query, error) in enumerate(zip(queries, errors)):
            if error is not None:
                self.context.set_response_status(error.status, error.reason, idx)
                answers.append(error_answer(error))
                continue
            if query.output == "embedding":
                answers.append(self._embedding_answer(embeddings[row]))
            else:
                answers.append(self._similar_answer(query.k, probabilities[row], found[0][row], found[1][row]))
            row += 1
        return answers

    def _header(self):
        return {"model": self.model_name, "model_version": self.version}

    def _embedding_answer(self, embedding):
        return {**self._header(), "dim": int(embedding.shape[0]), "normalized": self.bundle.normalize,
                "embedding": embedding.tolist()}

    def _similar_answer(self, k, probabilities, distances, positions):
        best = int(probabilities.argmax())
        neighbours = [
            {"id": item.id, "category": item.category, "distance": float(distance), "image": item.image}
            for distance, position in zip(distances[:k], positions[:k]) if position >= 0
            for item in (self.bundle.items[position],)
        ]
        return {**self._header(), "category": str(self.categories[best]),
                "confidence": float(probabilities[best]), "k": k, "neighbours": neighbours}
