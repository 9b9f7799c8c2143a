"""The batch path without TorchServe: rows in, one Answer per row out. Each row is answered on its own terms, so a
bad row, or a row asking for something else (an explanation, a description), never changes what the others get.
handler/visual_search_handler.py adapts it to TorchServe; another server could call it the same way."""
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch

from .bundle import load_bundle
from .catalogue import SearchRequest
from .catalogue.duplicates import calibrated_threshold, finish, plan_of
from .catalogue.live import ChangeFollower
from .errors import InputError, VisualSearchError
from .fileio import under_catalogues
from .request import Limits, compact_json, error_answer
from .runtime import CoreShare, Runtime, RuntimeSettings
from .runtime_settings import check_catalogue_runtime

log = logging.getLogger(__name__)
EMBEDDING_DECIMALS = 9  # under 1e-9 from the model's float32 values; about 25 KB of JSON for 2048 floats
KINDS = ("predict", "explain", "describe")


class NoMetrics:
    """The metrics interface of SearchService, recording nothing (visual_search.metrics records to TorchServe)."""

    def timed(self, stage):
        return nullcontext()

    def batch(self, size):
        pass

    def rejection(self, error):
        pass

    def gauge(self, name, value, unit="count"):
        pass


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes  # compact JSON


@dataclass
class Inferred:
    """A Prepared batch after the model and the catalogue: the model's outputs and, per row, Hits or an error."""
    prepared: object  # visual_search.runtime.Prepared
    embeddings: np.ndarray = None  # [photos, 2048], in prepared.photo_rows order
    probabilities: np.ndarray = None  # [photos, categories]
    found: list = None  # Hits, VisualSearchError or None (not searched) per row
    extras: list = None  # per row, the fields its similar-items answer adds (duplicates, diverse)


def no_explanations():
    return InputError("explanations are not available for this model: POST the photo to /predictions/<model>",
                      label="explain")


def internal_error(what):
    return VisualSearchError(f"internal error while {what}; the other requests of the batch are not affected",
                             label="internal")


class SearchService:
    """The model, its catalogue and the request limits of one archive, answering batches of rows."""

    def __init__(self, bundle, runtime, limits, cores, model_name=None, version=None, follower=None):
        self.bundle, self.runtime, self.limits, self.cores = bundle, runtime, limits, cores
        self.catalogue, self.follower = bundle.catalogue, follower
        self.max_k = limits.max_k  # the archive's; the limit is also at most the listings live now
        self.cap_k()
        self.model_name, self.version = model_name, version
        self.categories = np.array(bundle.categories)
        self.duplicate_threshold = calibrated_threshold(self.catalogue.manifest, bundle.manifest.get("weights_sha256"))

    @classmethod
    def load(cls, model_dir, settings=None, gpu_id=None, batch_size=1, model_name=None, version=None):
        """Loads the bundle in `model_dir` (raises on any mismatch) with the handler `settings` of its
        model-config.yaml (catalogue_dir, default_k, max_k, threads, changes: the line's change log), on CUDA
        device `gpu_id` when there is one."""
        settings = settings or {}
        cores = CoreShare(settings.get("threads"))
        bundle = load_bundle(model_dir, catalogue_dir=settings.get("catalogue_dir"), milvus=settings.get("milvus"))
        use_cuda = torch.cuda.is_available() and gpu_id is not None
        device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        runtime_settings, dropped = RuntimeSettings.from_dict(bundle.manifest["runtime"]).for_device(device)
        for name, why in dropped.items():
            log.info("runtime setting %s not applied: %s", name, why)
        check_catalogue_runtime(bundle.catalogue.manifest, runtime_settings)
        runtime = Runtime(bundle, device, runtime_settings, warmup_batch=batch_size)
        limits = Limits(default_k=int(settings.get("default_k", 4)), max_k=int(settings.get("max_k", 100)))
        follower = None
        if settings.get("changes") and not settings.get("milvus"):  # Milvus keeps its own changes
            follower = ChangeFollower(bundle.catalogue, under_catalogues(settings["changes"]),
                                      bundle.manifest["weights_sha256"])
        service = cls(bundle, runtime, limits, cores, model_name, version, follower)
        log.info("loaded %s v%s: catalogue %s (%d items, %s) on %s, runtime %s, %d threads (warm-up %.1f s)",
                 model_name, version, service.catalogue.folder, service.catalogue.count,
                 service.catalogue.manifest["factory"], device, runtime.settings.to_dict(), cores.threads,
                 runtime.warmup_seconds)
        return service

    def handle(self, rows, headers, kinds=None, metrics=NoMetrics()):
        """One Answer per row. `kinds`: per row "predict", "explain" or "describe" (default: all predict)."""
        self.cores.update()
        if self.follower is not None:
            with metrics.timed("Changes"):
                self.follower.refresh()
            self.record_changes(metrics)
            self.cap_k()
        kinds = list(kinds or ["predict"] * len(rows))
        with metrics.timed("Preprocess"):
            skip = {i for i, kind in enumerate(kinds) if kind != "predict"}
            prepared = self.runtime.prepare(rows, headers, self.limits, skip)
            prepared.errors = [no_explanations() if kind == "explain" else error
                               for kind, error in zip(kinds, prepared.errors)]
        metrics.batch(len(rows))
        inferred = self.infer(prepared, metrics)
        answers = self.answer(inferred, kinds)
        for error in [*prepared.errors, *inferred.found]:
            if isinstance(error, VisualSearchError):
                metrics.rejection(error)
        return answers

    def cap_k(self):
        """The largest k a request may ask for: the archive's, at most the listings live now."""
        live = self.catalogue.live_count if self.follower is not None else self.catalogue.count
        self.limits = replace(self.limits, max_k=min(self.max_k, live))

    def record_changes(self, metrics):
        """The overlay's gauges: changes not yet folded, the log's length, the lag at this batch, overlay bytes."""
        follower = self.follower
        metrics.gauge("UnfoldedChanges", follower.unfolded)
        metrics.gauge("ChangeLogLength", follower.applied)
        metrics.gauge("ChangeLag", follower.lag)
        metrics.gauge("OverlayBytes", follower.overlay.nbytes, "bytes")

    def infer(self, prepared, metrics=NoMetrics()):
        """The model on the batch's photos, then the catalogue for every row that asks for similar items."""
        inferred = Inferred(prepared, found=[None] * len(prepared.queries), extras=[{}] * len(prepared.queries))
        if prepared.batch is not None:
            with metrics.timed("Inference"):
                try:
                    inferred.embeddings, inferred.probabilities = self.runtime.embed(prepared.batch)
                except (RuntimeError, torch.cuda.OutOfMemoryError):
                    log.exception("the model failed on a batch of %d photos", len(prepared.batch))
                    for i in prepared.photo_rows:
                        inferred.found[i] = internal_error("running the model")
        rows, requests, plans = [], [], []
        for i, query in enumerate(prepared.queries):
            if query is None or query.output != "similar" or inferred.found[i] is not None:
                continue
            photo = prepared.photo_rows.get(i)
            predicted = None if photo is None else str(self.categories[inferred.probabilities[photo].argmax()])
            try:
                plan = plan_of(query.params, self.duplicate_threshold, self.catalogue.manifest, predicted)
            except InputError as error:
                inferred.found[i] = error
                continue
            vector = inferred.embeddings[prepared.photo_rows[i]] if i in prepared.photo_rows else None
            rows.append(i)
            plans.append(plan)
            requests.append(SearchRequest(k=plan.first_depth(), vector=vector, listing=query.listing,
                                          categories=query.categories, exclude=query.exclude))
        if requests:
            with metrics.timed("Search"):
                try:
                    results, extras = finish(self.catalogue, requests, self.catalogue.answer(requests), plans)
                except VisualSearchError as error:  # e.g. the catalogue engine did not answer (503)
                    results, extras = [error] * len(requests), [{}] * len(requests)
                except Exception:
                    log.exception("the catalogue failed on a batch of %d searches", len(requests))
                    results = [internal_error("searching the catalogue")] * len(requests)
                    extras = [{}] * len(requests)
            for i, result, extra in zip(rows, results, extras):
                inferred.found[i], inferred.extras[i] = result, extra
        return inferred

    def answer(self, inferred, kinds):
        """One Answer per row: its error with the error's status, or its JSON."""
        prepared, answers = inferred.prepared, []
        for i, kind in enumerate(kinds):
            error = prepared.errors[i]
            if error is None and isinstance(inferred.found[i], VisualSearchError):
                error = inferred.found[i]
            if error is None:
                try:
                    answers.append(Answer(200, compact_json(self._answer_of(inferred, i, kind))))
                    continue
                except Exception:
                    log.exception("building the answer of row %d failed", i)
                    error = internal_error("building the answer")
            answers.append(Answer(error.status, compact_json(error_answer(error))))
        return answers

    def _answer_of(self, inferred, i, kind):
        if kind == "describe":
            return self.description()
        query, photo = inferred.prepared.queries[i], inferred.prepared.photo_rows.get(i)
        if query.output == "embedding":
            return self._embedding_answer(inferred.embeddings[photo])
        return {**self._similar_answer(inferred.found[i], None if photo is None else inferred.probabilities[photo]),
                **inferred.extras[i]}

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

    def description(self):
        """The model summary (TorchServe shows it as customizedMetadata)."""
        manifest, catalogue = self.bundle.manifest, self.catalogue.manifest
        return {**self._header(), "categories": list(self.bundle.categories), "items": catalogue["count"],
                "catalogue": {"uid": catalogue["uid"], "version": catalogue.get("version"), "items": catalogue["count"],
                              "categories": catalogue["categories"], "profile": catalogue["profile"],
                              "factory": catalogue["factory"], "search": catalogue["search"],
                              "engine": catalogue.get("engine", "faiss"),
                              "bundled": manifest["catalogue"].get("bundled", False)},
                "embedding_dim": manifest["embedding_dim"],
                "preprocess": manifest["preprocess"], "runtime": self.runtime.settings.to_dict(),
                "duplicate_threshold": self.duplicate_threshold and {
                    **self.duplicate_threshold.to_dict(), "by_category": self.duplicate_threshold.by_category},
                "default_k": self.limits.default_k, "max_k": self.limits.max_k, "threads": self.cores.threads,
                "workers_on_host": self.cores.workers, "pid": os.getpid(),
                "changes": None if self.follower is None else {
                    "log": str(self.follower.log_path), "folded": self.follower.folded,
                    "applied": self.follower.applied, "added": self.follower.overlay.count,
                    "removed": self.follower.overlay.removed_count, "live_items": self.catalogue.live_count}}
