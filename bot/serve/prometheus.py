"""Prometheus metrics for ``bot serve`` (``GET /metrics``), on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
# label values come only from these and from models the server knows, never from raw input
# (issue 28: 300 requests naming unique 10 KB models grew /metrics from 12.6 KB to 6.1 MB)
ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
             "/v1/classify", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
UNKNOWN_MODEL = "(unknown)"
OTHER_ENDPOINT = "(other)"


class ServeMetrics:
    """Requests by model and status, tokens, queue depth, batch size and latencies."""

    def __init__(self, scheduler=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bot_requests", "HTTP requests by model, endpoint and status",
                                ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("bot_prompt_tokens", "Prompt tokens prefilled", ["model"],
                                     registry=r)
        self.generated = Counter("bot_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.batch = Histogram("bot_batch_size", "Requests decoded together per step",
                               buckets=(1, 2, 4, 8, 12, 16, 24, 32, 64), registry=r)
        self.ttft = Histogram("bot_time_to_first_token_seconds", "Queueing + prefill time",
                              ["model"], buckets=_LATENCY, registry=r)
        self.latency = Histogram("bot_request_seconds", "Generation request time, end to end",
                                 ["model", "outcome"], buckets=_LATENCY, registry=r)
        self.unexpected_errors = Counter(
            "bot_unexpected_errors", "Requests answered 500 because of an unexpected error",
            ["endpoint", "error"], registry=r)
        self.classified_texts = Counter("bot_classified_texts", "Texts classified", registry=r)
        self.queue = Gauge("bot_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running = Gauge("bot_running_requests", "Requests waiting or decoding", registry=r)
        if scheduler is not None:
            self.watch(scheduler)

    def watch(self, scheduler) -> None:
        self.queue.set_function(scheduler.queue_depth)
        self.running.set_function(scheduler.in_flight)

    # hooks called by the scheduler thread
    def first_token(self, req, seconds: float) -> None:
        model = _model(req)
        self.ttft.labels(model).observe(seconds)
        self.prompt_tokens.labels(model).inc(len(req.prompt_ids))

    def classified(self, n: int) -> None:
        self.classified_texts.inc(n)

    def step(self, batch_size: int) -> None:
        self.batch.observe(batch_size)

    def finished(self, req, seconds: float, failed: bool) -> None:
        model = _model(req)
        self.generated.labels(model).inc(len(req.tokens))
        outcome = "error" if failed else ("cancelled" if req.cancelled else "ok")
        self.latency.labels(model, outcome).observe(seconds)

    # hooks called by the HTTP layer
    def request(self, model: str, endpoint: str, status: int, known=None) -> None:
        """Count one request; a model not in ``known`` (when given) counts as "(unknown)"."""
        if known is not None and model not in known:
            model = UNKNOWN_MODEL
        self.requests.labels(model, _endpoint(endpoint), str(int(status))).inc()

    def unexpected(self, endpoint: str, error: str) -> None:
        """An exception no handler expected (its class name, from the code, is the label)."""
        self.unexpected_errors.labels(_endpoint(endpoint), error).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()


def _model(req) -> str:
    """A request's adapter as a label; every mixture (client-chosen weights) is one label."""
    return req.adapter or "base" if req.adapter is None or isinstance(req.adapter, str) \
        else "(mixture)"


def _endpoint(path: str) -> str:
    return path if path in ENDPOINTS else OTHER_ENDPOINT
