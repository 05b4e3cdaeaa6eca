"""Pipelines: wire a configuration to the components (run, eval, attack, compare, the toy world)."""
