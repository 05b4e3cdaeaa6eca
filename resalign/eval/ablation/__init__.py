"""Ablations and probes: solver fidelity against the exact hypergradient, component ablations and the
direction probes (:mod:`.measure`), with their tables and plots. It reports through
:mod:`resalign.eval.reports`."""
