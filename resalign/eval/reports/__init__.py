"""Reports, records and plots, the bottom of :mod:`resalign.eval`: tidy ``report.json`` rows and
Markdown tables (:mod:`.tidy`), statistics (mean, SEM, paired intervals), plots, the figures that
sweep cells record, and the reports of ``run`` and ``compare``. Nothing here generates or scores."""
