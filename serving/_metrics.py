"""Prometheus metrics with TF Serving's names, served by `--monitoring_config_file`.

`--monitoring_config_file` is a `tensorflow.serving.MonitoringConfig` text proto
(`prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }`); the
`tensorflow-serving-api` wheel does not ship that message, so it is declared here
with the same field names and numbers. When enabled, the REST port answers GET on
that path with the Prometheus text format, produced by prometheus_client from a
registry of this server's own (no process-global state, so several servers in one
process do not mix their counts).

TF Serving's metric names (servables/tensorflow/util.cc, saved_model_warmup_util.cc),
turned into Prometheus names the way its exporter does (`/` -> `:`):

| TF Serving metric | labels | here |
|---|---|---|
| /tensorflow/serving/request_count | model_name, status | counter (exposed with prometheus_client's `_total` suffix) |
| /tensorflow/serving/request_latency | model_name, API, entrypoint | histogram, microseconds, TF Serving's buckets (10 x 1.8^i, 33 buckets) |
| /tensorflow/serving/request_example_counts | model | histogram, buckets 1, 2, 4, ... 16384 |
| /tensorflow/serving/request_example_count_total | model | counter |
| /tensorflow/serving/model_warmup_latency | model_path, status | histogram, microseconds |

`request_count` and `request_latency` are recorded for every Predict, Classify,
Regress, MultiInference and GetModelMetadata call over gRPC (entrypoint GRPC) and
REST (entrypoint REST); latency, as in TF Serving, only for successful calls. Example
counts are recorded for every request that carries tf.Examples (Classify, Regress,
MultiInference); the warm-up latency for every version that has a warm-up file.
"""

from __future__ import annotations

import dataclasses

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

__all__ = [
    "DEFAULT_PATH",
    "Metrics",
    "MonitoringConfig",
    "load_monitoring_config",
    "parse_monitoring_config",
]

DEFAULT_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath
_LATENCY_BUCKETS = tuple(10 * 1.8**i for i in range(32))  # Exponential(10, 1.8, 33), last +Inf
_EXAMPLE_BUCKETS = tuple(float(2**i) for i in range(15))  # Exponential(1, 2, 15)


@dataclasses.dataclass(frozen=True)
class MonitoringConfig:
    enable: bool = False
    path: str = DEFAULT_PATH


def _message_class():
    pool = descriptor_pool.Default()
    full_name = "tfbn.serving.MonitoringConfig"
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))
    except KeyError:
        pass
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(
        name="tfbn/serving/monitoring_config.proto", package="tfbn.serving", syntax="proto3"
    )
    prom = fd.message_type.add(name="PrometheusConfig")
    prom.field.add(name="enable", number=1, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    prom.field.add(name="path", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    mon = fd.message_type.add(name="MonitoringConfig")
    mon.field.add(
        name="prometheus_config",
        number=1,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        type_name=".tfbn.serving.PrometheusConfig",
    )
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


def parse_monitoring_config(text: str, source: str = "<string>") -> MonitoringConfig:
    """Parse a MonitoringConfig text proto; unknown fields are errors, as in TF Serving."""
    proto = _message_class()()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as err:
        raise ValueError(
            f"Error parsing text-format tensorflow.serving.MonitoringConfig: "
            f"Invalid protobuf file: '{source}': {err}"
        ) from None
    prom = proto.prometheus_config
    path = prom.path or DEFAULT_PATH
    if not path.startswith("/"):
        raise ValueError(
            f"{source}: prometheus_config.path must start with '/'; Received: {path!r}"
        )
    return MonitoringConfig(enable=bool(prom.enable), path=path)


def load_monitoring_config(path: str) -> MonitoringConfig:
    with open(path, encoding="utf-8") as f:
        return parse_monitoring_config(f.read(), source=path)


class Metrics:
    """This server's metrics in their own prometheus_client registry."""

    def __init__(self, config: MonitoringConfig | None = None):
        from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

        # TF Serving exports no `_created` series; this prometheus_client switch is
        # process-wide, which is fine in a server process.
        disable_created_metrics()
        self.config = config or MonitoringConfig()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_count = Counter(
            ":tensorflow:serving:request_count",
            "The total number of requests.",
            ["model_name", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ["model_name", "API", "entrypoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.example_counts = Histogram(
            ":tensorflow:serving:request_example_counts",
            "The number of tensorflow.Examples per request.",
            ["model"],
            buckets=_EXAMPLE_BUCKETS,
            registry=r,
        )
        self.example_count_total = Counter(
            ":tensorflow:serving:request_example_count_total",
            "The total number of tensorflow.Examples.",
            ["model"],
            registry=r,
        )
        self.warmup_latency = Histogram(
            ":tensorflow:serving:model_warmup_latency",
            "Distribution of wall time (in microseconds) for warming up the model.",
            ["model_path", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    @property
    def path(self) -> str | None:
        """The URL path the Prometheus page is served on, or None when disabled."""
        return self.config.path if self.config.enable else None

    def record_request(
        self, model_name: str, api: str, entrypoint: str, status: str, seconds: float
    ) -> None:
        """One finished request: its status code name ("OK", "NOT_FOUND", ...) and time."""
        self.request_count.labels(model_name, status).inc()
        if status == "OK":
            self.request_latency.labels(model_name, api, entrypoint).observe(seconds * 1e6)

    def record_examples(self, model_name: str, count: int) -> None:
        self.example_counts.labels(model_name).observe(count)
        self.example_count_total.labels(model_name).inc(count)

    def record_warmup(self, model_path: str, status: str, seconds: float) -> None:
        self.warmup_latency.labels(model_path, status).observe(seconds * 1e6)

    def page(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
