"""Ray Serve wiring for ltr-serve: OpenAI ingress, predictor, least-work router, vLLM engine replicas.

Imports `ltr`; nothing in `ltr` imports this package.
"""

from deployments.app import AppArgs, PredictorArgs, build_app, build_predictor_app

__all__ = ["AppArgs", "PredictorArgs", "build_app", "build_predictor_app"]
