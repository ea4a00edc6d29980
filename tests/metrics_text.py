"""Samples of a Prometheus text exposition (what /metrics serves), read with prometheus_client's parser."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def samples(exposition: str, name: str, labels: Mapping[str, str] | None = None) -> list[Sample]:
    """The samples named `name` (as written: a counter's with `_total`, a histogram's `_bucket`…) whose labels
    include `labels`, in the order of the text."""
    wanted = dict(labels or {})
    return [
        sample
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    ]


def value(exposition: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """The value of the first such sample; None when there is none."""
    found = samples(exposition, name, labels)
    return found[0].value if found else None
