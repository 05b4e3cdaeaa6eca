"""The paper's downstream protocol: fine-tuning an unlearned model on benign, harmful or contaminated
data with the registered ADAPT methods (:mod:`.finetune`, :mod:`.pairs`), the attack plan, the
comparison of methods before and after fine-tuning (:mod:`.comparison`, :mod:`.methods`) and matched
unlearning strength (:mod:`.matching`). It measures through :mod:`resalign.eval.scoring` and reports
through :mod:`resalign.eval.reports`."""
