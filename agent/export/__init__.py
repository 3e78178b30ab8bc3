"""Where the agent sends what it computed: JSON lines, Unix socket, the gRPC exporter."""
