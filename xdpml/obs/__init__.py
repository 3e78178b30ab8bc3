"""Observability: logging setup, OpenTelemetry metrics (OTLP and Prometheus), health endpoints."""
