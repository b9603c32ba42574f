"""The OpenAI-compatible router: one endpoint for users, routed by model to the worker that holds it."""
