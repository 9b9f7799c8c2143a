"""The parity gate of the OpenVINO runtimes: each runtime embeds a sample of the catalogue and held-out photos and
searches its own vectors exactly. precision@4 against torch fp32 with the same weights (a drop over MAX_DROP is
refused unless accepted), recall@10 against fp32's neighbours, and which query runtimes may search the catalogue a
runtime embeds (recall@10 against its own neighbours of at least COMPATIBLE_RECALL)."""
import random
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from training.embedding import embed_items
from training.optimize import CALIBRATION_PHOTOS, Ir, calibration_items, calibration_tensors, convert, quantize
from visual_search import openvino_engine
from visual_search.model import TrainedModel
from visual_search.runtime import Runtime
from visual_search.runtime_settings import RUNTIME_NAMES as SERVED
from visual_search.runtime_settings import RuntimeSettings

MAX_DROP = 0.01  # precision@4, fp32 minus the candidate
COMPATIBLE_RECALL = 0.98  # recall@10 of other queries against a catalogue runtime's own neighbours
K, RECALL_K = 4, 10
REFERENCE = "torch-fp32"
FASTEST_FIRST = ("openvino-int8", "openvino-bf16", "openvino-fp32")  # measured on these CPUs: docs/performance.md
RUNTIME_NAMES = ("auto", *SERVED)
GATE_ITEMS, GATE_QUERIES = 2000, 500


class QualityDropError(ValueError):
    """The candidate runtime lost more precision@4 than the gate allows; the message gives both figures."""


@dataclass
class GateSample:
    """A seeded sample of the catalogue and the held-out photos the gate measures on (the queries left out of
    the catalogue sample)."""
    root: object
    catalogue: list
    queries: list
    categories: list
    queries_from: str = "held-out photos"

    @classmethod
    def draw(cls, root, catalogue, queries, categories, max_items=GATE_ITEMS, max_queries=GATE_QUERIES, seed=0):
        """Without held-out photos, a fifth of a catalogue sample serves as queries (left out of the rest)."""
        rng, catalogue = random.Random(seed), list(catalogue)
        queries_from = "held-out photos"
        if not queries:
            pool = rng.sample(catalogue, min(len(catalogue), max_items + max_queries))
            queries, queries_from = pool[:max(1, len(pool) // 5)], "a catalogue sample left out of the gate's catalogue"
        queries = rng.sample(list(queries), min(len(queries), max_queries))
        held_out = {it.id for it in queries}
        rest = [it for it in catalogue if it.id not in held_out]
        if len(rest) < RECALL_K:
            raise ValueError(f"the parity gate needs at least {RECALL_K} catalogue photos besides its queries")
        return cls(root, sorted(rng.sample(rest, min(len(rest), max_items)), key=lambda it: it.id), queries,
                   list(categories), queries_from)


class Runtimes:
    """The runtimes of one model, each made on first need: torch fp32 (the reference, on `device`), and the OpenVINO
    runtimes over the fp32 IR and the int8 IR, calibrated on catalogue photos through the archive's preprocessing."""

    def __init__(self, model, preprocess, normalize, root, catalogue, categories, device="cpu", calibration=None):
        self.model, self.preprocess, self.normalize = model, preprocess, normalize
        self.root, self.categories, self.device = root, categories, device
        self.calibration = calibration or calibration_items(catalogue, CALIBRATION_PHOTOS)
        self.irs = {}

    def ir(self, precision):
        if precision not in self.irs:
            if precision == "int8":
                fp32 = self.ir("fp32").model
                tensors = calibration_tensors(self.root, self.calibration, self.preprocess, self.categories)
                self.irs["int8"] = Ir(quantize(fp32, tensors), "int8", {"photos": len(tensors), "from": "catalogue"})
            else:
                self.irs["fp32"] = Ir(convert(self.model, self.preprocess.image_size), "fp32")
        return self.irs[precision]

    def ir_for(self, name):
        settings = RuntimeSettings.named(name)
        if settings.engine != "openvino":
            return None
        return self.ir("int8" if settings.precision == "int8" else "fp32")

    def source(self, name):
        ir = self.ir_for(name)
        return TrainedModel(self.model, self.preprocess, self.normalize, ir=ir and ir.model,
                            ir_precision=ir and ir.precision)

    def runtime(self, name):
        settings = RuntimeSettings.named(name)
        return Runtime(self.source(name), "cpu" if settings.engine == "openvino" else self.device, settings)


def exact_neighbours(catalogue, queries, k):
    index = faiss.IndexFlatL2(catalogue.shape[1])
    index.add(np.ascontiguousarray(catalogue, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(catalogue)))[1]


def recall(found, expected):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, expected)]))


@dataclass
class Measurements:
    """The sample embedded by each runtime, once, and exact neighbours of one runtime's queries among the catalogue
    vectors of another."""
    sample: GateSample
    runtimes: Runtimes
    batch_size: int = 64
    workers: int = 0
    embedded: dict = field(default_factory=dict)  # name -> (catalogue vectors, query vectors, query probabilities)
    seconds: dict = field(default_factory=dict)

    def vectors(self, name):
        if name not in self.embedded:
            start, runtime = time.perf_counter(), self.runtimes.runtime(name)
            catalogue, _ = embed_items(runtime, self.sample.root, self.sample.catalogue, self.sample.categories,
                                       self.batch_size, self.workers, desc=f"gate: catalogue sample, {name}")
            queries, probabilities = embed_items(runtime, self.sample.root, self.sample.queries,
                                                 self.sample.categories, self.batch_size, self.workers,
                                                 desc=f"gate: queries, {name}")
            self.embedded[name] = catalogue, queries, probabilities
            self.seconds[name] = round(time.perf_counter() - start, 1)
        return self.embedded[name]

    def neighbours(self, queries_of, catalogue_of, k):
        return exact_neighbours(self.vectors(catalogue_of)[0], self.vectors(queries_of)[1], k)

    def precision(self, name):
        categories = np.array([it.category for it in self.sample.catalogue])
        wanted = np.array([it.category for it in self.sample.queries])
        found = categories[self.neighbours(name, name, K)]
        return float((found == wanted[:, None]).mean())

    def accuracy(self, name):
        predicted = np.array(self.sample.categories)[self.vectors(name)[2].argmax(axis=1)]
        return float(np.mean(predicted == np.array([it.category for it in self.sample.queries])))


def measure(measurements, name):
    """The gate's figures of one runtime against the fp32 reference."""
    reference, candidate = measurements.precision(REFERENCE), measurements.precision(name)
    drop = reference - candidate
    return {"runtime": name, "precision_at_4": round(candidate, 4), "fp32_precision_at_4": round(reference, 4),
            "drop": round(drop, 4), "passed": drop <= MAX_DROP,
            "recall_at_10_vs_fp32": round(recall(measurements.neighbours(name, name, RECALL_K),
                                                 measurements.neighbours(REFERENCE, REFERENCE, RECALL_K)), 4),
            "accuracy": round(measurements.accuracy(name), 4),
            "fp32_accuracy": round(measurements.accuracy(REFERENCE), 4)}


def servable(name):
    """The query runtimes an archive of a bundle built for `name` can run: torch fp32 (model.pt: the GPU
    fallback), and the OpenVINO precisions its one IR serves on this CPU."""
    if name == "openvino-int8":
        return ["torch-fp32", name]
    names = ["torch-fp32", "openvino-fp32"] + (["openvino-bf16"] if openvino_engine.cpu_supports("bf16") else [])
    return names if name != REFERENCE else ["torch-fp32"]


def compatible(measurements, catalogue_of):
    """The other runtimes whose queries find the catalogue runtime's own top-10 (recall >= COMPATIBLE_RECALL)."""
    own = measurements.neighbours(catalogue_of, catalogue_of, RECALL_K)
    found = []
    for name in servable(catalogue_of):
        if name != catalogue_of:
            value = recall(measurements.neighbours(name, catalogue_of, RECALL_K), own)
            if value >= COMPATIBLE_RECALL:
                found.append({**RuntimeSettings.named(name).record(), "recall_at_10": round(value, 4)})
    return found


@dataclass
class Choice:
    """The runtime a bundle is built for, its IR (None for torch), the gate's record, and the catalogue's runtime
    record (with the query runtimes measured compatible)."""
    settings: RuntimeSettings
    ir: Ir
    parity: dict
    catalogue_runtime: dict



def candidates(requested, device="cpu", distributed=False):
    """The runtimes to try, fastest first: one when asked for by name; for "auto", the OpenVINO ones this CPU runs
    natively, then torch fp32 (on CUDA, or under torchrun, torch fp32 alone: the GPU path)."""
    if requested != "auto":
        return [requested]
    if str(device).startswith("cuda") or distributed:
        return [REFERENCE]
    try:
        supported = [n for n in FASTEST_FIRST if openvino_engine.cpu_supports(RuntimeSettings.named(n).precision)]
    except Exception as error:  # openvino missing or unusable here: the torch engine
        print(f"auto runtime: OpenVINO is not usable here ({error}); the torch engine", flush=True)
        supported = []
    return [*supported, REFERENCE]


def choose(requested, names, runtimes, sample, accept_drop=False, batch_size=64, workers=0):
    """Measures the candidate `names` in turn and returns the Choice of the first that passes the gate. A runtime
    asked for by name that fails raises QualityDropError, unless `accept_drop`; "auto" moves on to the next one.
    `sample` may be None when torch fp32 is the only candidate."""
    tried, measurements = [], Measurements(sample, runtimes, batch_size, workers)
    for name in names:
        if name == REFERENCE:
            result = {"runtime": name, "passed": True, "note": "the reference itself: no gate"}
            tried.append(result)
            break
        result = measure(measurements, name)
        tried.append(result)
        print(f"parity gate, {name}: precision@4 {result['precision_at_4']:.4f} against fp32's "
              f"{result['fp32_precision_at_4']:.4f} (drop {result['drop']:+.4f}, at most {MAX_DROP}), recall@10 "
              f"against fp32's neighbours {result['recall_at_10_vs_fp32']:.4f}", flush=True)
        if result["passed"]:
            break
        if requested != "auto":
            if not accept_drop:
                raise QualityDropError(
                    f"parity gate: {name} reaches precision@4 {result['precision_at_4']:.4f} against fp32's "
                    f"{result['fp32_precision_at_4']:.4f} on {len(sample.queries)} held-out photos, a drop of "
                    f"{result['drop']:.4f} (more than {MAX_DROP}); nothing was written. Check the calibration "
                    f"photos, choose another --runtime, or pass --accept-quality-drop to build it anyway")
            result["accepted"] = True
            break
    settings = RuntimeSettings.named(name)
    found = compatible(measurements, name) if name != REFERENCE and measurements.embedded else []
    parity = {"runtime": name, "requested": requested, "max_drop": MAX_DROP, "compatible_recall": COMPATIBLE_RECALL,
              "k": K, "recall_k": RECALL_K, "catalogue_items": len(sample.catalogue) if sample else 0,
              "queries": len(sample.queries) if sample else 0, "queries_from": sample and sample.queries_from,
              "tried": tried, "compatible": found,
              "embedding_seconds": dict(measurements.seconds)}
    return Choice(settings, runtimes.ir_for(name), parity, {**settings.record(), "compatible": found})


def rebuild(name, model, preprocess, normalize, root, items, categories, device="cpu", batch_size=64, workers=0,
            accept_drop=False):
    """The Choice of runtime `name` for retrained weights of a catalogue it embeds: its IR made anew (int8 calibrated
    on the catalogue's photos) and gated on a catalogue sample left out (there are no held-out photos here)."""
    sample = None if name == REFERENCE else GateSample.draw(root, items, [], categories)
    held = {it.id for it in sample.queries} if sample else set()
    runtimes = Runtimes(model, preprocess, normalize, root, [it for it in items if it.id not in held], categories,
                        device)
    return choose(name, [name], runtimes, sample, accept_drop, batch_size=batch_size, workers=workers)
