"""Kubernetes API: list/watch reflector, pod cache, AgentConfig validation and watch, status, events."""
