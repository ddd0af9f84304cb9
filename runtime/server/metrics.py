"""Prometheus ``/metrics``: the hub's counters read at scrape time (``hub.metrics()``), plus the chat
endpoint's own request counter and duration histogram.

    favor_model_ready                              1 once the engine is loaded
    favor_model_info{model,backend}                1
    favor_streams_active                           running streams
    favor_stream_info{stream,name,source,state}    1 per stream the hub lists
    favor_stream_captions_total{stream}            counters per stream
    favor_stream_windows_total{stream}
    favor_stream_dropped_total{stream,reason}      reason: late | overflow
    favor_stream_queue_depth{stream}               windows waiting (pending + ring)
    favor_stream_latency_seconds{stream,quantile}  window close -> caption; quantile 0.5 | 0.95 | 1 (max)
    favor_stream_latency_bound_seconds{stream}     the stream's current bound (realtime streams)
    favor_captions_total, favor_dropped_total{reason}, favor_windows_total   every stream ever served
    favor_latency_seconds{quantile}                over every listed stream
    favor_decode_steps_total, favor_decode_batch_mean   continuous batching: steps, mean rows per step
    favor_chat_requests_total{status}, favor_chat_seconds   POST /v1/chat/completions

The hub forgets a removed stream; its counts are kept here (``Retired``) so the totals stay monotonic
(counts between the last scrape and the removal are not seen)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

QUANTILES = (("0.5", "latency_p50"), ("0.95", "latency_p95"), ("1", "latency_max"))
COUNTED = ("captions", "windows", "dropped_late", "dropped_overflow")
MAX_LABEL_CHARS = 200
# chat answers take from well under a second (tiny) to tens of seconds (a long clip on a CPU)
CHAT_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120)


class Retired:
    """Monotonic totals: per-stream counts seen at the last scrape, folded in when a stream vanishes."""

    def __init__(self):
        self.last: dict[str, dict[str, int]] = {}
        self.gone = dict.fromkeys(COUNTED, 0)

    def totals(self, streams: dict[str, dict]) -> dict[str, int]:
        for sid in set(self.last) - set(streams):
            for k in COUNTED:
                self.gone[k] += self.last.pop(sid)[k]
        self.last = {sid: {k: int(row.get(k) or 0) for k in COUNTED} for sid, row in streams.items()}
        return {k: self.gone[k] + sum(row[k] for row in self.last.values()) for k in COUNTED}


class HubCollector:
    def __init__(self, state):
        self.state = state
        self.retired = Retired()

    def collect(self):
        state = self.state
        ready = GaugeMetricFamily("favor_model_ready", "1 once the model is loaded and serving")
        ready.add_metric([], 1.0 if state.status == "ready" else 0.0)
        yield ready
        info = InfoMetricFamily("favor_model", "the served model and backend", labels=["model", "backend"])
        info.add_metric([state.config.model_name, state.backend or ""], {})
        yield info
        if state.status != "ready":
            return
        m = state.hub.metrics()
        yield from self._streams(m.get("streams", {}))
        yield from self._totals(m.get("streams", {}), m.get("totals", {}))

    def _streams(self, streams: dict[str, dict]):
        info = InfoMetricFamily("favor_stream", "one per listed stream", labels=["stream"])
        fam = {k: CounterMetricFamily(f"favor_stream_{k}", f"{k} per stream", labels=["stream"])
               for k in ("captions", "windows")}
        dropped = CounterMetricFamily("favor_stream_dropped", "windows dropped per stream", labels=["stream", "reason"])
        depth = GaugeMetricFamily("favor_stream_queue_depth", "windows waiting per stream", labels=["stream"])
        lat = GaugeMetricFamily("favor_stream_latency_seconds", "window close -> caption, per stream",
                                labels=["stream", "quantile"])
        bound = GaugeMetricFamily("favor_stream_latency_bound_seconds", "latency bound per stream", labels=["stream"])
        for sid, row in streams.items():
            info.add_metric([sid], {k: str(row.get(k) or "")[:MAX_LABEL_CHARS] for k in ("name", "source", "state")})
            for k, f in fam.items():
                f.add_metric([sid], float(row.get(k) or 0))
            for reason in ("late", "overflow"):
                dropped.add_metric([sid, reason], float(row.get(f"dropped_{reason}") or 0))
            depth.add_metric([sid], float(row.get("queue_depth") or 0))
            for q, key in QUANTILES:
                if row.get(key) is not None:
                    lat.add_metric([sid, q], float(row[key]))
            if row.get("bound") is not None:
                bound.add_metric([sid], float(row["bound"]))
        yield from (info, *fam.values(), dropped, depth, lat, bound)

    def _totals(self, streams: dict[str, dict], totals: dict):
        active = GaugeMetricFamily("favor_streams_active", "running streams")
        active.add_metric([], float(totals.get("streams") or 0))
        yield active
        t = self.retired.totals(streams)
        for k in ("captions", "windows"):
            yield CounterMetricFamily(f"favor_{k}", f"{k} over every stream served", value=float(t[k]))
        dropped = CounterMetricFamily("favor_dropped", "windows dropped over every stream", labels=["reason"])
        for reason in ("late", "overflow"):
            dropped.add_metric([reason], float(t[f"dropped_{reason}"]))
        yield dropped
        lat = GaugeMetricFamily("favor_latency_seconds", "window close -> caption over listed streams",
                                labels=["quantile"])
        for q, key in QUANTILES[:2]:
            if totals.get(key) is not None:
                lat.add_metric([q], float(totals[key]))
        yield lat
        yield CounterMetricFamily("favor_decode_steps", "continuous-batching decode steps",
                                  value=float(totals.get("decode_steps") or 0))
        if totals.get("mean_decode_batch") is not None:
            yield GaugeMetricFamily("favor_decode_batch_mean", "mean captions per decode step",
                                    value=float(totals["mean_decode_batch"]))


class Metrics:
    """The app's own registry (never the process-global one: tests build many apps)."""

    def __init__(self, state):
        self.registry = CollectorRegistry()
        self.registry.register(HubCollector(state))
        self.chat_requests = Counter("favor_chat_requests", "chat completions by HTTP status",
                                     ["status"], registry=self.registry)
        self.chat_seconds = Histogram("favor_chat_seconds", "chat completion wall time (non-streamed: "
                                      "request -> answer; streamed: request -> last chunk)",
                                      buckets=CHAT_BUCKETS_S, registry=self.registry)
