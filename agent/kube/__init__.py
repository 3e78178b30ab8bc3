"""Kubernetes API side of the agent: list/watch reflector, AgentConfig watch, status, events."""
