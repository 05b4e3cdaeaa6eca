"""Downstream fine-tuning of a released (possibly unlearned) model, the way its users would do it.

This is the *evaluation* fine-tuning of the paper (App. B.4), run by the registered ADAPT method
itself: :class:`Finetuner` hands the adapter's ``adapt`` a loss over the data schedule, exactly as
the simulated ADAPT of Alg. 2 does, so ``resalign attack --adapt NAME`` accepts every registered
adapter, a plugin's included, and measures the very method that was simulated. The protocol's
defaults are the diffusers example scripts': the denoising loss ‖ε − ε_θ(x_t, t, c)‖², batch size 1,
AdamW (β = 0.9/0.999, weight decay 1e-2, ε = 1e-8), gradient-norm clipping at 1, constant learning
rate (the adapter's ``paper_lr`` unless given), 200 steps, the text encoder frozen.

A method that prescribes its L_FT (``finetune_loss`` class attribute: DreamBooth, full fine-tuning
with prior preservation) gets it; a loss that declares ``needs_prior`` gets prior pairs, the given
``prior`` set or class images the model generated before fine-tuning (``train_dreambooth.py``'s
``--with_prior_preservation``). The fine-tuned weights come back *in the base parameter space*
(:meth:`Finetuner.merged`), the dict that :func:`resalign.eval.scoring.generate.generate` evaluates through
``unet_params``. Stress tests of the paper run through the same loop:

* parameter-space escape (App. C.1, Tab. 11): L = L_FT(θ') − λ‖θ' − θ‖_p, with the distance taken in
  the base space between the fine-tuned and the released weights;
* contaminated data (Fig. 4, :func:`resalign.eval.protocol.pairs.contaminate`) and staged relearning (Fig. 7) are
  data schedules (:class:`Stage`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from resalign import ops
from resalign.components import (
    OPTIMIZERS,
    DiffusionContext,
    FinetuneConfig,
    Params,
    finetune_loss_of,
    needs,
)
from resalign.errors import ConfigError, UnknownComponentError
from resalign.eval.protocol.pairs import (
    Batches,
    Encoded,
    PairData,
    Pairs,
    check_pairs,
    encode_pairs,
)

#: Learning rate of an adapter that declares no ``paper_lr`` (that of full fine-tuning, App. B.4).
DEFAULT_LR = 1e-5


def _registry(registry=None):
    from resalign.registry import get_registry

    return registry or get_registry()


def adapter_class(name: str, registry=None) -> Any:
    """The registered ADAPT method ``name``; an unknown one is a :class:`ConfigError` listing them."""
    registry = _registry(registry)
    try:
        return registry.get("adapter", name)
    except UnknownComponentError:
        raise ConfigError(f"--adapt {name!r}: expected one of {', '.join(registry.names('adapter'))} "
                          "(the registered adapters, see `resalign plugins --kind adapter`)") from None


def reference_lr(adapt: str, registry=None) -> float:
    """The learning rate of the method's reference script (its ``paper_lr``; App. B.2/B.4)."""
    return float(getattr(adapter_class(adapt, registry), "paper_lr", DEFAULT_LR))


@dataclass
class Stage:
    """``steps`` fine-tuning steps on ``data`` (a data schedule is a list of stages, run in order)."""

    data: PairData
    steps: int
    name: str = ""


@dataclass
class FinetuneSpec:
    """One downstream fine-tuning configuration (the evaluation protocol of App. B.4 by default)."""

    adapt: str = "full"
    steps: int = 200
    lr: float | None = None  # None: the adapter's paper_lr
    optimizer: str = "adamw"
    batch_size: int = 1
    weight_decay: float = 1e-2  # AdamW's
    max_grad_norm: float = 1.0
    #: rank (and alpha = rank, scale 1, as the diffusers LoRA script) of any adapter with a ``rank`` option
    lora_rank: int = 4
    adapter_options: dict[str, Any] = field(default_factory=dict)
    finetune_loss: str = "denoise"  # unless the adapter prescribes its own
    finetune_loss_options: dict[str, Any] = field(default_factory=dict)
    num_class_images: int = 50
    class_prompt: str | None = None  # prior pairs: None = each instance caption is its own class prompt
    escape_p: int | None = None  # parameter-space escape (Tab. 11): p in {1, 2}
    escape_lambda: float = 0.5

    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else reference_lr(self.adapt)

    def resolved_adapter_options(self) -> dict[str, Any]:
        cls = adapter_class(self.adapt)
        fields = {f.name for f in dataclasses.fields(cls.Config)} if hasattr(cls, "Config") else set()
        out: dict[str, Any] = {}
        if "rank" in fields:
            out["rank"] = self.lora_rank
            if "alpha" in fields:
                out["alpha"] = float(self.lora_rank)
        return out | dict(self.adapter_options)

    def config(self) -> FinetuneConfig:
        """The configuration C the adapter runs (the same type as a simulated one of Alg. 2)."""
        return FinetuneConfig(
            adapter=self.adapt, lr=self.resolved_lr(), steps=self.steps, optimizer=self.optimizer,
            batch_size=self.batch_size, adapter_options=self.resolved_adapter_options(),
            max_grad_norm=self.max_grad_norm if self.max_grad_norm and self.max_grad_norm > 0 else None,
            weight_decay=self.weight_decay if self.optimizer == "adamw" else None,
        )

    def validate(self) -> FinetuneSpec:
        adapter_class(self.adapt)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.steps < 0:
            raise ConfigError(f"--steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.escape_p is not None and self.escape_p not in (1, 2):
            raise ConfigError(f"--escape p={self.escape_p}: expected p=1 or p=2")
        if self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {self.lora_rank}")
        return self


def loss_name(adapt: str, finetune_loss: str = "denoise") -> str:
    """L_FT of a fine-tuning with ``adapt``: the one the method prescribes, else ``finetune_loss``."""
    return finetune_loss_of(adapter_class(adapt), finetune_loss)


def uses_prior(adapt: str, finetune_loss: str = "denoise") -> bool:
    """Whether fine-tuning with ``adapt`` trains on prior pairs (its loss declares ``needs_prior``)."""
    return needs(_registry().get("finetune-loss", loss_name(adapt, finetune_loss)), "prior")


# --------------------------------------------------------------------------- the loop


@dataclass
class FinetuneLog:
    """What a fine-tuning run did: per-step losses (and escape distances) and the data stage per step."""

    losses: list[float] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)


#: ``on_eval(step, params)``: called at step 0, every ``eval_every`` steps and at the end, with the
#: fine-tuned weights in the base space (name -> tensor of the original UNet).
EvalFn = Callable[[int, Mapping[str, torch.Tensor]], None]


class Finetuner:
    """One downstream fine-tuning run of ``bundle``'s UNet on a data schedule, with periodic evaluation.

    The bundle is never modified: the adapter is pure (θ in, θ_FT out), and training happens in
    float32 (a float32 copy of the UNet when the bundle is in half precision, as mixed-precision
    scripts keep master weights). ``class_generation`` holds the sampling settings (``steps``,
    ``guidance``) of the class images when a prior-preservation loss needs them generated.
    """

    def __init__(
        self,
        bundle: Any,
        spec: FinetuneSpec,
        stages: Sequence[Stage],
        *,
        seed: int = 0,
        prior: PairData | None = None,
        class_generation: Mapping[str, Any] | None = None,
        registry=None,
    ):
        self.bundle = bundle
        self.class_generation = dict(class_generation or {})
        self.spec = spec.validate()
        if not stages:
            raise ConfigError("fine-tuning needs at least one data stage")
        for i, st in enumerate(stages):
            check_pairs(st.data, st.name or f"fine-tuning data (stage {i + 1})")
            if st.steps < 0:
                raise ConfigError(f"stage {st.name or i + 1}: steps must be >= 0")
        if prior is not None:
            check_pairs(prior, "prior-preservation data")
        self.stages = list(stages)
        self.seed = int(seed)
        self.prior_data = prior
        registry = _registry(registry)
        self.adapter = registry.create("adapter", spec.adapt, spec.resolved_adapter_options())
        self.loss = registry.create("finetune-loss", loss_name(spec.adapt, spec.finetune_loss),
                                    dict(spec.finetune_loss_options))
        self.log = FinetuneLog()
        self._theta_ft: Params | None = None

    @property
    def total_steps(self) -> int:
        return sum(st.steps for st in self.stages)

    def _prior(self) -> Encoded:
        if self.prior_data is not None:
            return encode_pairs(self.bundle, self.prior_data)
        from resalign.eval.scoring.generate import generate

        n = max(1, self.spec.num_class_images)
        if self.spec.class_prompt:
            prompts = [self.spec.class_prompt] * n
        else:
            caps = list(self.stages[0].data.prompts)
            prompts = [caps[i % len(caps)] for i in range(n)]
        images = generate(self.bundle, prompts, seed=10_000 + self.seed, **self.class_generation)
        return encode_pairs(self.bundle, Pairs(images, prompts, "class"))

    def _to_bundle(self, params: Params) -> dict[str, torch.Tensor]:
        dtype = self.bundle.dtype
        return {n: t.detach().to(dtype) for n, t in params.items()}

    def merged(self) -> dict[str, torch.Tensor]:
        """The fine-tuned weights in the base space, in the bundle's dtype (detached)."""
        if self._theta_ft is None:
            raise RuntimeError("Finetuner.merged() before run()")
        return self._to_bundle(self._theta_ft)

    def context(self) -> tuple[DiffusionContext, Params]:
        """The diffusion context L_FT is evaluated in, and θ (the released weights, float32)."""
        from resalign.core.functional import FunctionalUNet

        unet = self.bundle.unet
        if self.bundle.dtype != torch.float32:
            unet = copy.deepcopy(unet).float()
        model = FunctionalUNet(unet)
        theta = model.base_params()
        ctx = DiffusionContext(model=model, theta0=theta, schedule=self.bundle.noise_schedule(),
                               uncond=self.bundle.encode_prompts([""]).float())
        return ctx, theta

    def run(
        self,
        *,
        eval_every: int = 0,
        on_eval: EvalFn | None = None,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Train through every stage; evaluate at step 0, every ``eval_every`` steps and at the end."""
        ctx, theta = self.context()
        rng = np.random.default_rng(self.seed)
        noise = torch.Generator().manual_seed(self.seed)  # ε and t of every step
        schedule = [(st, Batches(encode_pairs(self.bundle, st.data), self.spec.batch_size, rng)) for st in self.stages]
        step_stage = [pair for pair in schedule for _ in range(pair[0].steps)]
        prior = Batches(self._prior(), self.spec.batch_size, rng) if needs(self.loss, "prior") else None
        total, spec, evaluated = self.total_steps, self.spec, set()

        def maybe_eval(step: int, params: Params, force: bool = False) -> None:
            if on_eval is not None and step not in evaluated and (
                    force or step == 0 or (eval_every > 0 and step % eval_every == 0)):
                evaluated.add(step)
                on_eval(step, self._to_bundle(params))

        def objective(params: Params) -> torch.Tensor:
            """L_FT on the next batch of the schedule; the i-th call sees the weights after i steps."""
            i = len(self.log.losses)
            maybe_eval(i, params)
            stage, batches = step_stage[i]
            batch = batches.next()
            if prior is not None:
                batch.prior = prior.next()
            loss = self.loss(ctx, params, batch, noise)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"fine-tuning diverged at step {i + 1} (loss {value}); lower --lr (now {spec.resolved_lr():g})")
            self.log.losses.append(value)
            self.log.stages.append(stage.name)
            if spec.escape_p is not None:
                # the trained entries are the ones that carry a graph; the rest are θ itself
                dist = lp_distance([v - theta[k] for k, v in params.items() if v.requires_grad], spec.escape_p)
                self.log.distances.append(float(dist.detach()))
                loss = loss - spec.escape_lambda * dist
            if progress is not None:
                progress(i + 1, total, value)
            return loss

        cfg = dataclasses.replace(spec.config(), steps=total)
        result = self.adapter.adapt(theta, objective, cfg, generator=torch.Generator().manual_seed(self.seed))
        self._theta_ft = ops.detach(result.theta_ft)
        maybe_eval(total, self._theta_ft, force=True)
        return self.merged()


def lp_distance(deltas: Sequence[torch.Tensor], p: int) -> torch.Tensor:
    """‖θ' − θ‖_p over all trained weights (zero-safe: the gradient at 0 is 0)."""
    if not deltas:
        return torch.zeros(())
    parts = torch.stack([torch.linalg.vector_norm(d.float(), ord=p) for d in deltas])
    return torch.linalg.vector_norm(parts, ord=p)
