"""TorchServe handler: TorchServe's context and batch to visual_search.service.SearchService, and its answers back.

Every row keeps its own status: BaseHandler.handle would take the first row's path (predict, explain, describe) for
the whole batch. The status line carries the standard phrase only; the reason is in the JSON body."""
import time
from http import HTTPStatus

from ts.torch_handler.base_handler import BaseHandler

from visual_search.metrics import TorchServeMetrics
from visual_search.service import SearchService

JSON = "application/json"


class VisualSearchHandler(BaseHandler):
    def initialize(self, context):
        config = context.model_yaml_config or {}
        model = context.manifest.get("model", {})
        self.service = SearchService.load(context.system_properties["model_dir"], config.get("handler", {}),
                                          gpu_id=context.system_properties.get("gpu_id"),
                                          batch_size=int(config.get("batchSize", 1)),
                                          model_name=model.get("modelName"), version=model.get("modelVersion"))
        self.initialized = True

    def handle(self, data, context):
        """One answer per row, as compact JSON bytes, whatever the other rows of the batch ask for."""
        start = time.perf_counter()
        self.context = context
        metrics = TorchServeMetrics(context.metrics)
        kinds = [row_kind(context, i) for i in range(len(data))]
        headers = [context.get_all_request_header(i) for i in range(len(data))]
        answers = self.service.handle(data, headers, kinds, metrics)
        for i, answer in enumerate(answers):
            if answer.status != 200:
                # TorchServe 0.12 frames the phrase by its length in characters but sends its UTF-8 bytes: a
                # client's text there would corrupt the worker's reply, so only the standard phrase goes there.
                context.set_response_status(answer.status, HTTPStatus(answer.status).phrase, i)
            context.set_response_content_type(i, JSON)
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return [answer.body for answer in answers]


def row_kind(context, i):
    """"predict", or what TorchServe's frontend marked the row as: "explain" (/explanations) or "describe"."""
    for kind in ("explain", "describe"):
        if context.get_request_header(i, kind) == "True":
            return kind
    return "predict"
