"""Generation and scoring: the evaluation sets and their presets, batched generation from prompt sets at
given UNet parameters, the registered scorers run over the images (:class:`~.evaluator.Evaluator`),
``resalign score`` on images that already exist, and the quick evaluation that ends ``resalign run``.
It builds on :mod:`resalign.eval.reports` for its rows and statistics."""
