"""Prometheus metrics of one replica (``GET /metrics``).

A private :class:`CollectorRegistry` per replica keeps the exposition to sae-serve's own
series. With several replicas, a scrape of ``/metrics`` is answered by whichever replica
Ray Serve routes it to; every series carries a ``replica`` label so scrapes from
different replicas are never confused (Ray's own metrics endpoint aggregates the whole
cluster).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class FeatureChannelState(Protocol):
    """What is read of the feature side channel's receiver: ``healthy`` and, when it has
    them, the counters named in ``_FeatureChannelCollector.COUNTERS``."""

    @property
    def healthy(self) -> bool: ...


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, replica: str | None = None):
        self.replica = replica or f"pid-{os.getpid()}"
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["replica", "endpoint", "transport"]
        self.requests = Counter("sae_serve_requests", "Requests by outcome", [*labels, "outcome"],
                                registry=self.registry)
        self.latency = Histogram("sae_serve_request_latency_seconds", "Request latency (to the last byte)",
                                 labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("sae_serve_prompt_tokens", "Prompt tokens processed", ["replica"],
                                     registry=self.registry)
        self.generated_tokens = Counter("sae_serve_generated_tokens", "Tokens generated", ["replica"],
                                        registry=self.registry)
        self.steered = Counter("sae_serve_steered_requests", "Requests that carried steering", ["replica"],
                               registry=self.registry)
        self.extracted_tokens = Counter("sae_serve_extracted_tokens", "Tokens whose features were returned",
                                        ["replica"], registry=self.registry)

    def observe(self, endpoint: str, transport: str, outcome: str, seconds: float) -> None:
        self.requests.labels(self.replica, endpoint, transport, outcome).inc()
        self.latency.labels(self.replica, endpoint, transport).observe(seconds)

    def tokens(self, prompt: int = 0, generated: int = 0, extracted: int = 0) -> None:
        if prompt:
            self.prompt_tokens.labels(self.replica).inc(prompt)
        if generated:
            self.generated_tokens.labels(self.replica).inc(generated)
        if extracted:
            self.extracted_tokens.labels(self.replica).inc(extracted)

    def watch_feature_channel(self, receiver: FeatureChannelState) -> None:
        """Export the feature side channel's counters (read from ``receiver`` at each scrape)."""
        self.registry.register(_FeatureChannelCollector(self.replica, receiver))

    def steered_request(self) -> None:
        self.steered.labels(self.replica).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FeatureChannelCollector:
    """``sae_serve_feature_channel_*``: the receiver's own counters, read when scraped."""

    COUNTERS = (
        ("messages", "Feature side-channel messages received and decoded"),
        ("bad_frames", "Feature side-channel messages dropped because they could not be decoded"),
        ("dropped_chunks", "Feature chunks dropped because their request had already ended"),
        ("restarts", "Times the feature side channel's receiving task was restarted"),
    )

    def __init__(self, replica: str, receiver: FeatureChannelState):
        self.replica = replica
        self.receiver = receiver

    def collect(self) -> Iterator[Metric]:
        for name, doc in self.COUNTERS:
            family = CounterMetricFamily(f"sae_serve_feature_channel_{name}", doc, labels=["replica"])
            family.add_metric([self.replica], float(getattr(self.receiver, name, 0)))
            yield family
        up = GaugeMetricFamily("sae_serve_feature_channel_up", "1 while the feature side channel's receiver runs",
                               labels=["replica"])
        up.add_metric([self.replica], 1.0 if self.receiver.healthy else 0.0)
        yield up

    def describe(self) -> list[Metric]:
        return list(self.collect())
