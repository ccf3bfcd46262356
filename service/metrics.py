"""Prometheus metrics of one app (its own registry, so several apps in one process don't clash).

With `--workers N` each worker process counts its own requests; scrape each, or run one worker
per instance behind the load balancer.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("wildreid_http_requests_total", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("wildreid_http_request_seconds", "HTTP request latency by route",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("wildreid_embed_batch_images", "images per model forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_seconds = Histogram("wildreid_embed_batch_seconds", "seconds per model forward pass",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.decisions = Counter("wildreid_identify_decisions_total", "identify decisions per animal",
                                 ["decision"], registry=self.registry)
        self.gallery_images = Gauge("wildreid_gallery_images", "searchable images per species gallery",
                                    ["species"], registry=self.registry)
        self.change_seq = Gauge("wildreid_change_seq", "database change sequence applied to the galleries",
                                registry=self.registry)
        self.corrupt_files = Gauge("wildreid_corrupt_image_files", "stored image files found corrupt or missing "
                                   "(served or embedded again), until the photo is uploaded again",
                                   registry=self.registry)
        self.orphans_removed = Counter("wildreid_orphan_files_removed_total", "image files no database row names, "
                                       "removed by the orphan sweep", registry=self.registry)
        self.decode_bytes = Gauge("wildreid_decode_budget_bytes_in_use", "bytes of the decoding memory budget "
                                  "reserved by decoding photos and the requests that keep them",
                                  registry=self.registry)
        self.started = Gauge("wildreid_start_time_seconds", "when the app started (unix time)",
                             registry=self.registry)
        self.started.set(time.time())

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.batch_seconds.observe(seconds)

    def render(self, gallery_sizes: dict[str, int], seq: int) -> bytes:
        for species, size in gallery_sizes.items():
            self.gallery_images.labels(species).set(size)
        self.change_seq.set(seq)
        return generate_latest(self.registry)
