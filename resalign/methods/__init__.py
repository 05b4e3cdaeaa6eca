"""Method recipes of ``resalign compare`` (Tab. 1 and Tab. 8): built-in plugin, registered through the
same hook as third-party packages (``register_methods``).

Each recipe names a whole unlearning run by the :class:`~resalign.settings.run.RunConfig` fields it
fixes, and its role in the comparison (:class:`~resalign.components.MethodRecipe`):

* ``base``: the model as loaded, measured before fine-tuning only;
* ``ga``, ``esd``, ``ca``: plain unlearning (Eq. 2, β = 0 in Eq. 3: L_harm + α·R) with gradient
  ascent, ESD's or concept ablation's harmful loss, matched to ResAlign's strength;
* ``resalign``: Alg. 2 with the preset's settings; ``resalign-LOSS`` picks the harmful loss and
  ``@SOLVER`` the hypergradient solver (``resalign-ga@trajectory``); its β = 0 twin is the baseline
  of the same loss;
* ``imma`` and ``meta-unlearning``: the peers of Tab. 8 expressed with resalign's own components
  (:data:`IMMA` and :data:`META_UNLEARNING` say what each keeps and what it simplifies).
"""

from __future__ import annotations

from resalign.components import MethodRecipe
from resalign.hookspecs import hookimpl

#: The one fine-tuning configuration C that both Tab. 8 peers simulate (instead of π(C) of Alg. 2):
#: one full-parameter Adam step at lr 1e-4 on the denoising loss.
FIXED_CONFIG_POOL = {"lrs": [1e-4], "lrs_by_optimizer": {}, "steps": [1], "optimizers": ["adam"],
                     "finetune_losses": ["denoise"], "adapters": ["full"], "batch_size": 1, "max_lr_steps": 0.0}


def _baseline(loss: str, what: str) -> MethodRecipe:
    return MethodRecipe(settings={"loss": loss, "beta": 0.0}, matched=True,
                        summary=f"plain unlearning (Eq. 2, β = 0) with {what}")


BASE = MethodRecipe(unlearns=False, summary="the model as loaded (not unlearned)")

RESALIGN = MethodRecipe(
    ours=True, twin="{loss}", loss_variants=True, solver_choice=True,
    summary="ResAlign (Alg. 2) with the preset's settings; NAME-LOSS and @SOLVER pick loss and solver")

#: IMMA-style (Zheng & Yeh, "IMMA: immunizing text-to-image models against malicious adaptation"):
#: a bilevel defence whose upper level is the harmful loss *after* the simulated adaptation, whose
#: lower level is one unrolled fine-tuning step, on one fixed fine-tuning configuration.
#:
#: Keeps: the bilevel objective with β = 1 (only L_harm(θ_FT) in Eq. 3's harmful term), the exact
#: hypergradient of a one-step unrolled inner problem (solver ``unrolled``), one simulation per outer
#: step (J = 1) of one fixed configuration (:data:`FIXED_CONFIG_POOL`, one step) on one fixed D_FT batch
#: (``fixed_ft_data``).
#: Simplifies: the harmful loss is the preset's (GA, ESD or CA instead of IMMA's denoising loss on the
#: concept's images), the inner problem fine-tunes on D_FT (benign pairs with some harmful ones, as
#: every recipe here) rather than on the concept's images, and the utility regularizer α·R is kept so
#: that its utility is comparable with the other rows.
IMMA = MethodRecipe(
    settings={"beta": 1.0, "solver": "unrolled", "solver_options": {}, "J": 1, "pool": FIXED_CONFIG_POOL,
              "fixed_ft_data": True},
    matched=True, loss_variants=True,
    summary="IMMA-style: β = 1, one unrolled step on one fixed fine-tuning configuration (Tab. 8)")

#: Meta-Unlearning-style (Gao et al., "Meta-unlearning on diffusion models"): plain unlearning plus a
#: first-order meta term, the harmful loss after a simulated relearning step, with fixed timesteps.
#:
#: Keeps: the sum of the unlearning loss and the meta term (β = 0.5: equal weights), the first-order
#: hypergradient (solver ``first-order``: ∇L_harm at θ_FT, the Jacobian taken as the identity), one
#: simulation (J = 1) of one fixed configuration (:data:`FIXED_CONFIG_POOL`) on one fixed D_FT batch
#: (``fixed_ft_data``), and fixed timesteps: the same timesteps and noise at every outer step
#: (``fixed_noise``) for both L_harm(θ) and L_harm(θ_FT) (``common_noise``).
#: Simplifies: the simulated relearning fine-tunes on D_FT (benign pairs with some harmful ones) rather
#: than on the harmful data alone, and Meta-Unlearning's second meta term, which makes benign gradients
#: conflict with the harmful ones, is left out (α·R preserves utility instead).
META_UNLEARNING = MethodRecipe(
    settings={"beta": 0.5, "solver": "first-order", "solver_options": {}, "J": 1, "pool": FIXED_CONFIG_POOL,
              "fixed_ft_data": True, "common_noise": True, "fixed_noise": True},
    matched=True, loss_variants=True,
    summary="Meta-Unlearning-style: β = 0.5, first-order meta term, fixed timesteps and configuration (Tab. 8)")

RECIPES: dict[str, MethodRecipe] = {
    "base": BASE,
    "ga": _baseline("ga", "gradient ascent"),
    "esd": _baseline("esd", "ESD's negative-guidance target"),
    "ca": _baseline("ca", "concept ablation towards the anchor"),
    "resalign": RESALIGN,
    "imma": IMMA,
    "meta-unlearning": META_UNLEARNING,
}


@hookimpl
def register_methods(register):
    for name, recipe in RECIPES.items():
        register(name, recipe)
