"""The handler's own metrics, through TorchServe's metrics cache (shown at :8082/metrics in prometheus mode).

    VisualSearchPreprocessTime, VisualSearchInferenceTime, VisualSearchSearchTime   histograms, ms per batch
    VisualSearchBatchSize                                                           histogram, requests per batch
    VisualSearchRejected{Reason=...}                                                counter, by InputError.label
"""
import time
from contextlib import contextmanager

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

PREFIX = "VisualSearch"


@contextmanager
def timed(metrics, stage):
    """Adds the ms spent in the block to the histogram VisualSearch<stage>Time."""
    start = time.perf_counter()
    yield
    if metrics is not None:
        metrics.add_time(f"{PREFIX}{stage}Time", (time.perf_counter() - start) * 1000, None, "ms", [],
                         MetricTypes.HISTOGRAM)


def record_batch(metrics, size, errors):
    """The batch size, and one count per rejected request under its reason label."""
    if metrics is None:
        return
    metrics.add_metric(f"{PREFIX}BatchSize", size, "count", None, [], MetricTypes.HISTOGRAM)
    for error in errors:
        if error is not None:
            metrics.add_counter(f"{PREFIX}Rejected", 1, None, [Dimension("Reason", error.label)])
