"""Settings of ``resalign run``: :mod:`~resalign.settings.run` (the RunConfig, resolved once onto a
preset), :mod:`~resalign.settings.presets` (the ``toy`` and ``sd`` values) and
:mod:`~resalign.settings.checks` (every name, number and path checked before any work)."""
