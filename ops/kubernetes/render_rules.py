"""Prints the PrometheusRule of ops/prometheus/alerts.yml for the Prometheus Operator.

The alert rules have one source, ``alerts.yml`` (checked and unit-tested by promtool); the
Kubernetes object is generated from it so that the two cannot drift apart, and
``tests/integration/test_kubernetes_manifests.py`` fails when the committed copy is stale.

    python ops/kubernetes/render_rules.py > ops/kubernetes/base/prometheusrule.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ALERTS = Path(__file__).resolve().parent.parent / "prometheus" / "alerts.yml"
HEADER = (
    "# Generated from ops/prometheus/alerts.yml by ops/kubernetes/render_rules.py: do not edit.\n"
    "# python ops/kubernetes/render_rules.py > ops/kubernetes/base/prometheusrule.yaml\n"
)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the PromQL expressions) as literal blocks, as alerts.yml does."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def prometheus_rule(alerts: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule whose ``spec.groups`` are exactly the groups of an alerts file."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "bastion",
            "labels": {
                "app.kubernetes.io/name": "bastion",
                "app.kubernetes.io/component": "gateway",
            },
        },
        "spec": {"groups": alerts["groups"]},
    }


def render(alerts_text: str) -> str:
    rule = prometheus_rule(yaml.safe_load(alerts_text))
    return HEADER + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=1000)


def main() -> None:
    sys.stdout.write(render(ALERTS.read_text()))


if __name__ == "__main__":
    main()
