"""The handler's own metrics, through TorchServe's metrics cache (shown at :8082/metrics in prometheus mode).

    VisualSearchPreprocessTime, VisualSearchInferenceTime, VisualSearchSearchTime   histograms, seconds per batch
    VisualSearchBatchSize                                                           histogram, requests per batch
    VisualSearchRejected{Reason=...}                                                counter, by InputError.label

TorchServe's Prometheus histograms have the client's default buckets, made for seconds (0.005 s to 10 s), so the
stage times are recorded in seconds and their quantiles mean something:
    histogram_quantile(0.95, sum by (le) (rate(VisualSearchInferenceTime_bucket[5m])))
"""
import time
from contextlib import contextmanager

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

PREFIX = "VisualSearch"


@contextmanager
def timed(metrics, stage):
    """Adds the seconds spent in the block to the histogram VisualSearch<stage>Time."""
    start = time.perf_counter()
    yield
    if metrics is not None:
        metrics.add_time(f"{PREFIX}{stage}Time", time.perf_counter() - start, None, "s", [], MetricTypes.HISTOGRAM)


def record_batch(metrics, size, errors):
    """The batch size, and one count per rejected request under its reason label."""
    if metrics is None:
        return
    metrics.add_metric(f"{PREFIX}BatchSize", size, "count", None, [], MetricTypes.HISTOGRAM)
    for error in errors:
        record_rejection(metrics, error)


def record_rejection(metrics, error):
    """One count under the error's reason label (nothing for None)."""
    if metrics is not None and error is not None:
        metrics.add_counter(f"{PREFIX}Rejected", 1, None, [Dimension("Reason", error.label)])
