"""Measurement, by role in subpackages, imports pointing down this list:

- :mod:`~resalign.eval.ablation`: solver fidelity, component ablations and direction probes;
- :mod:`~resalign.eval.protocol`: the paper's downstream protocol (fine-tuning, attacks, comparisons,
  strength matching);
- :mod:`~resalign.eval.scoring`: generating images from prompt sets and scoring them;
- :mod:`~resalign.eval.reports`: tidy rows, statistics, tables, plots and the records of sweep cells.
"""
