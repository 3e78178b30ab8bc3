"""The inference collector: gRPC ingest, models, verdicts, scored-flow sinks."""
