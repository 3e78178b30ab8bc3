"""What the agent and the collector share: the wire schema (generated code in ``v1``), the
columnar codec, column batches and TLS helpers. Imports nothing else of xdpml but errors."""
