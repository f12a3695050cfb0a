"""Statistics, Prometheus metrics and (later) drift and the dashboard."""
