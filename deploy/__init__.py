"""Serving with Ray Serve.

An OpenAI-compatible HTTP ingress (with its own API-key check: Serve's HTTP port
is not covered by Ray auth), a batching engine that runs prefill and decode steps
through the same ``StageWorker`` actors used for training, the Serve deployment
config and Grafana dashboards.
"""
