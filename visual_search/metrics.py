"""The handler's metrics in TorchServe's metrics cache (:8082/metrics in Prometheus mode): VisualSearch<Stage>Time
and VisualSearchBatchSize histograms, stage times in seconds so that the client's default buckets fit, and
VisualSearchRejected{Reason} counts. The one module of visual_search that imports TorchServe."""
import time
from contextlib import contextmanager

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

PREFIX = "VisualSearch"


class TorchServeMetrics:
    """What SearchService records, written to the metrics of a TorchServe context."""

    def __init__(self, metrics):
        self.metrics = metrics

    @contextmanager
    def timed(self, stage):
        """Adds the seconds spent in the block to the histogram VisualSearch<stage>Time."""
        start = time.perf_counter()
        yield
        self.metrics.add_time(f"{PREFIX}{stage}Time", time.perf_counter() - start, None, "s", [],
                              MetricTypes.HISTOGRAM)

    def batch(self, size):
        self.metrics.add_metric(f"{PREFIX}BatchSize", size, "count", None, [], MetricTypes.HISTOGRAM)

    def rejection(self, error):
        self.metrics.add_counter(f"{PREFIX}Rejected", 1, None, [Dimension("Reason", error.label)])

    def gauge(self, name, value, unit="count"):
        self.metrics.add_metric(f"{PREFIX}{name}", value, unit, None, [], MetricTypes.GAUGE)
