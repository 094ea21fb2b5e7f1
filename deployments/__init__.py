"""Ray Serve wiring for ltr-serve: OpenAI ingress, predictor, least-work router, vLLM engine replicas.

Imports `ltr`; nothing in `ltr` imports this package. Importing the package itself loads nothing, so
`ltr resolve-config` (deployments.resolve) reads a config without building the app's modules first.
"""
