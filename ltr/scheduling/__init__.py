"""Scheduling: the pure policy core and its vLLM V1 adapter."""
