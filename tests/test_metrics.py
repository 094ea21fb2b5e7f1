"""The ingress's predictor-wait histogram: kept as per-bucket counts in `/v1/ltr/stats`, exported on
`/metrics` as a Prometheus histogram (cumulative buckets, +Inf = count)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.metrics import WaitHistogram, prometheus_text


def test_predictor_waits_land_in_their_buckets_and_export_cumulatively() -> None:
    waits = WaitHistogram()
    for seconds in (0.01, 0.025, 0.3, 0.7, 4.0, 99.0):
        waits.observe(seconds)
    snapshot = waits.snapshot()
    assert snapshot["count"] == 6 and snapshot["sum_s"] == pytest.approx(104.035)
    assert {le: n for le, n in snapshot["le"].items() if n} == {"0.025": 2, "0.5": 1, "1.0": 1, "5.0": 1, "+Inf": 1}

    text = prometheus_text("ingress-1", {"predictor_wait_s": snapshot}, {}).decode()
    samples = {(s.name, s.labels.get("le")): s.value
               for family in text_string_to_metric_families(text) if family.name == "ltr_predictor_wait_seconds"
               for s in family.samples}
    assert samples[("ltr_predictor_wait_seconds_bucket", "0.025")] == 2
    assert samples[("ltr_predictor_wait_seconds_bucket", "0.25")] == 2
    assert samples[("ltr_predictor_wait_seconds_bucket", "1.0")] == 4
    assert samples[("ltr_predictor_wait_seconds_bucket", "30.0")] == 5
    assert samples[("ltr_predictor_wait_seconds_bucket", "+Inf")] == 6
    assert samples[("ltr_predictor_wait_seconds_count", None)] == 6
    assert samples[("ltr_predictor_wait_seconds_sum", None)] == pytest.approx(104.035)

    both = prometheus_text("ingress-1", {"predictor_wait_s": snapshot, "predictor_replica_s": waits.snapshot()},
                           {}).decode()
    names = {family.name for family in text_string_to_metric_families(both)}
    assert {"ltr_predictor_wait_seconds", "ltr_predictor_replica_seconds"} <= names
