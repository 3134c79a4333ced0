"""Handoff: hybrid edge-cloud LLM inference.

One import name over the project's layers (pyproject.toml maps the folders):
`handoff.shared` (both sides) <- `handoff.cloud` (the verifier) <- `handoff.edge` (the device), with
`handoff.edge.evaluation` and `handoff.edge.simulation` as leaves and `handoff.cli` on top.
"""
