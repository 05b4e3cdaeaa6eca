"""Typed protocols of the component kinds that plugins provide.

This module sits at the level of :mod:`resalign.hookspecs`: plugins import it, it imports nothing of
the core. Each component is a class with a ``name``, a ``Config`` dataclass and one or two methods;
:class:`Component` gives every such class a validating ``make(options)``. Components are pure with
respect to global state: they receive the model function, the parameters and the batch.

Notation follows the paper: θ (``theta``) the parameters being unlearned, θ_FT (``theta_ft``) the
parameters after a simulated fine-tuning ADAPT(θ, D_FT, C), γ the Moreau-envelope proximity
coefficient (Eq. 5), K the number of Richardson iterations (Alg. 1), J the number of sampled
configurations per outer step (Alg. 2).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Union, runtime_checkable

from resalign.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch

    from resalign.models.bundle import T2IBundle

    Tensor = torch.Tensor
else:
    Tensor = Any

#: Parameters as a flat dict name -> tensor (the UNet's ``named_parameters`` names).
Params = dict[str, "Tensor"]

#: The component kinds, as shown by ``resalign plugins`` and used by the registry.
KINDS: tuple[str, ...] = (
    "harmful-loss",
    "regularizer",
    "adapter",
    "solver",
    "finetune-loss",
    "scorer",
    "model",
    "method",
)


class Component:
    """Mixin giving a component class a validated constructor from plain options (TOML, CLI).

    A component declares the data it needs as class attributes, and the core builds that data only
    for the components that ask (it never tests component names):

    * ``needs_anchor`` (harmful losses): anchor-prompt embeddings in ``DenoiseBatch.anchor_cond``,
      the harmful prompts with ``data.concept`` replaced by ``data.anchor``;
    * ``needs_prior`` (fine-tuning losses): prior-preservation pairs in ``DenoiseBatch.prior``;
    * ``needs_trajectory`` (solvers): ``HypergradProblem.unroll``, the adaptation replayed with its
      autograd graph.

    Classes that do not subclass :class:`Component` may set the same attributes; :func:`needs` reads
    them with a default of ``False``.
    """

    name: ClassVar[str]
    needs_anchor: ClassVar[bool] = False
    needs_prior: ClassVar[bool] = False
    needs_trajectory: ClassVar[bool] = False

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else type(self).Config()

    @classmethod
    def make(cls, options: Mapping[str, Any] | None = None, *, where: str = "") -> Component:
        """Build the component from ``options``; unknown or mistyped keys raise :class:`ConfigError`."""
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(f"{where or cls.name}: options must be a table of KEY = VALUE, got {options!r}")
        options = dict(options or {})
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        for key in options:
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"{where or cls.name}: unknown option {key!r}{hint}; "
                    f"expected one of: {', '.join(sorted(fields)) or '(none)'}"
                )
        _check_scalar_types(cls.Config, options, where or cls.name)
        try:
            config = cls.Config(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where or cls.name}: {exc}") from exc
        return cls(config)


#: The data a component can declare that it needs (``needs_<what>`` class attributes, see :class:`Component`).
NEEDS: tuple[str, ...] = ("anchor", "prior", "trajectory")


def needs(component: Any, what: str) -> bool:
    """Whether ``component`` (a class or an instance) declares ``needs_<what> = True``."""
    if what not in NEEDS:
        raise ValueError(f"needs({what!r}): expected one of {', '.join(NEEDS)}")
    return bool(getattr(component, f"needs_{what}", False))


def finetune_loss_of(adapter: Any, configured: str) -> str:
    """L_FT of a fine-tuning with ``adapter`` (class or instance): the loss the method prescribes
    (``finetune_loss`` class attribute, e.g. DreamBooth's prior preservation), else ``configured``."""
    return getattr(adapter, "finetune_loss", None) or configured


def _check_scalar_types(config_cls: type, options: Mapping[str, Any], where: str) -> None:
    """Options of fields annotated ``int``, ``float`` or ``bool`` (or those ``| None``) must be of that type."""
    import types
    import typing

    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # annotations that do not resolve are not checked
        return
    for key, value in options.items():
        tp = hints.get(key)
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        args = set(typing.get_args(tp)) if union else {tp}
        if value is None and type(None) in args:
            continue
        args.discard(type(None))
        if len(args) != 1:
            continue
        (want,) = args
        if want is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: option {key!r} expects true or false, got {value!r}")
        if want is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: option {key!r} expects an integer, got {value!r}")
        if want is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: option {key!r} expects a number, got {value!r}")


# --------------------------------------------------------------------------- diffusion data


@dataclass(frozen=True, eq=False)
class Conditioning:
    """The text conditioning c of ε_θ(x_t, t, c) for a model with more than hidden states (SDXL).

    ``hidden`` (B, L, D) is the UNet's ``encoder_hidden_states`` (for SDXL both text encoders'
    penultimate hidden states, concatenated along D); ``pooled`` (B, P) the second encoder's pooled,
    projected output and ``time_ids`` (B, 6) the micro-conditioning (original height and width, crop
    top and left, target height and width), which the UNet reads as ``added_cond_kwargs``
    (``text_embeds``, ``time_ids``). A model with one text encoder (SD 1.x / 2.x, the toy world) is
    conditioned by its hidden states alone, and a bare (B, L, D) tensor stands for it everywhere a
    conditioning is taken (:data:`Cond`).

    A conditioning behaves like its rows: ``c[idx]`` selects samples, ``torch.cat([c1, c2])`` stacks
    them (classifier-free guidance, ESD's conditional and unconditional predictions in one call),
    ``c.expand(n, ...)`` repeats a single row, ``c.to(...)`` / ``c.float()`` move or cast every part,
    and ``shape`` / ``dtype`` / ``device`` are the hidden states'. So a loss written for hidden-state
    tensors switches the pooled embedding and time ids with the prompt without knowing of them.
    """

    hidden: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        return Conditioning(fn(self.hidden), None if self.pooled is None else fn(self.pooled),
                            None if self.time_ids is None else fn(self.time_ids))

    @property
    def shape(self):
        return self.hidden.shape

    @property
    def dtype(self):
        return self.hidden.dtype

    @property
    def device(self):
        return self.hidden.device

    @property
    def ndim(self) -> int:
        return self.hidden.ndim

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def size(self, dim: int | None = None):
        return self.hidden.size() if dim is None else self.hidden.size(dim)

    def __getitem__(self, rows) -> Conditioning:
        """The samples ``rows`` (an index tensor or list, a slice, an int) of every part."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        return self._map(lambda x: x[rows.to(x.device) if hasattr(rows, "to") else rows])

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda x: x.to(*args, **kwargs))

    def float(self) -> Conditioning:
        return self._map(lambda x: x.float())

    def detach(self) -> Conditioning:
        return self._map(lambda x: x.detach())

    def expand(self, n: int, *_rest) -> Conditioning:
        """``n`` rows of a one-row conditioning (as ``tensor.expand(n, -1, -1)`` of hidden states)."""
        return self._map(lambda x: x.expand(n, *x.shape[1:]))

    def chunk(self, k: int) -> tuple[Conditioning, ...]:
        n = -(-len(self) // k)
        return tuple(self[slice(i, i + n)] for i in range(0, len(self), n))

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """Rows of ``conds`` stacked (all tensors, or all conditionings with the same parts)."""
        import torch

        conds = list(conds)
        if not any(isinstance(c, Conditioning) for c in conds):
            return torch.cat(conds)
        if not all(isinstance(c, Conditioning) for c in conds) or len(
                {(c.pooled is None, c.time_ids is None) for c in conds}) != 1:
            raise ValueError("cannot concatenate conditionings with different parts (hidden / pooled / time ids)")
        parts = [torch.cat([getattr(c, k) for c in conds]) if getattr(conds[0], k) is not None else None
                 for k in ("hidden", "pooled", "time_ids")]
        return Conditioning(*parts)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        import torch

        kwargs = kwargs or {}
        if func is torch.cat and not kwargs.get("dim") and (len(args) < 2 or args[1] == 0):
            return cls.cat(args[0] if args else kwargs["tensors"])
        raise TypeError(f"{getattr(func, '__name__', func)} is not defined for a Conditioning; use its parts "
                        "(hidden, pooled, time_ids)")


#: A conditioning as every loss, regularizer and model function takes it: hidden states alone (a
#: tensor, one-encoder models) or a :class:`Conditioning` (SDXL: with pooled embeddings and time ids).
Cond = Union["Tensor", Conditioning]


def unet_kwargs(cond: Cond) -> dict[str, Any]:
    """The keyword arguments of a diffusers ``UNet2DConditionModel`` call for ``cond``:
    ``encoder_hidden_states`` and, where the conditioning has them, ``added_cond_kwargs``
    (``text_embeds`` the pooled embedding, ``time_ids`` the micro-conditioning)."""
    if not isinstance(cond, Conditioning):
        return {"encoder_hidden_states": cond}
    kwargs: dict[str, Any] = {"encoder_hidden_states": cond.hidden}
    added = {k: v for k, v in (("text_embeds", cond.pooled), ("time_ids", cond.time_ids)) if v is not None}
    if added:
        kwargs["added_cond_kwargs"] = added
    return kwargs


@dataclass
class DenoiseBatch:
    """Prompt-image pairs in model space (VAE latents for SD, pixels in [-1, 1] for the toy world)."""

    x0: Tensor  # (B, C, H, W)
    cond: Cond  # (B, L, D) text-encoder hidden states of ``prompts`` (a Conditioning for SDXL)
    prompts: list[str] = field(default_factory=list)
    anchor_cond: Cond | None = None  # CA: the conditioning of the anchor concept's prompts
    prior: DenoiseBatch | None = None  # DreamBooth prior-preservation pairs


@dataclass
class PairSet:
    """Prompt-image pairs in model space, with their conditioning (and CA anchor conditioning)."""

    x0: Tensor
    cond: Cond
    prompts: list[str]
    anchor_cond: Cond | None = None

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    def sample(self, n: int, generator: torch.Generator) -> DenoiseBatch:
        import torch

        m = len(self)
        idx = torch.randperm(m, generator=generator)[: min(n, m)]
        if n > m:  # sample with replacement beyond the set's size
            idx = torch.cat([idx, torch.randint(0, m, (n - m,), generator=generator)])
        return DenoiseBatch(
            x0=self.x0[idx.to(self.x0.device)], cond=self.cond[idx.to(self.cond.device)],
            prompts=[self.prompts[i] for i in idx.tolist()],
            anchor_cond=self.anchor_cond[idx.to(self.x0.device)] if self.anchor_cond is not None else None,
        )


@dataclass
class TrainingData:
    """D_harmful, D_preserve (also the prior pairs of prior preservation) and the D_FT pool (B.4)."""

    harmful: PairSet
    preserve: PairSet
    finetune: PairSet


class ModelFn(Protocol):
    """ε_θ(x_t, t, c): the UNet as a function of a parameter dict (torch.func.functional_call); c is
    hidden states or a :class:`Conditioning` (:func:`unet_kwargs`)."""

    def __call__(self, params: Params, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...


class Schedule(Protocol):
    """The forward diffusion process q(x_t | x_0) used by every loss."""

    num_train_timesteps: int

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor: ...

    def sample(self, x0: Tensor, generator: Any = None) -> tuple[Tensor, Tensor]:
        """Draw (noise ε, timesteps t) for a batch."""
        ...

    def weight(self, t: Tensor) -> Tensor:
        """The loss weight w_t of the paper's L_harmful and R (ones by default)."""
        ...


@dataclass
class DiffusionContext:
    """What every loss, regularizer and ADAPT method receives (built once per run by the core)."""

    model: ModelFn
    theta0: Params  # the frozen original parameters (distillation, ESD and CA targets)
    schedule: Schedule
    uncond: Cond  # (1, L, D) conditioning of the empty prompt (with its pooled embedding for SDXL)


# --------------------------------------------------------------------------- losses


@runtime_checkable
class HarmfulLoss(Protocol):
    """L_harmful(θ) of Eq. 3 on harmful prompt-image pairs (GA, ESD, CA, ...)."""

    name: ClassVar[str]

    def __call__(
        self, ctx: DiffusionContext, params: Params, batch: DenoiseBatch, generator: Any = None
    ) -> Tensor: ...


@runtime_checkable
class Regularizer(Protocol):
    """R(θ) of Eq. 3 on preservation prompt-image pairs (distillation to the original model)."""

    name: ClassVar[str]

    def __call__(
        self, ctx: DiffusionContext, params: Params, batch: DenoiseBatch, generator: Any = None
    ) -> Tensor: ...


@runtime_checkable
class FinetuneLoss(Protocol):
    """L_FT of the simulated (or real) downstream fine-tuning: denoising, prior preservation, ..."""

    name: ClassVar[str]

    def __call__(
        self, ctx: DiffusionContext, params: Params, batch: DenoiseBatch, generator: Any = None
    ) -> Tensor: ...


# --------------------------------------------------------------------------- ADAPT


#: The optimizers a fine-tuning configuration may name (functional, in :mod:`resalign.adapters`).
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")


@dataclass
class FinetuneConfig:
    """One configuration C ~ π(C) of Alg. 2 (learning rate, steps, optimizer, loss, ADAPT method)."""

    adapter: str = "full"
    lr: float = 1e-5
    steps: int = 10
    optimizer: str = "sgd"  # sgd | adam | adamw
    finetune_loss: str = "denoise"
    batch_size: int = 1
    adapter_options: dict[str, Any] = field(default_factory=dict)
    #: clip the trainable tensors' gradient to this norm each step (None: no clipping)
    max_grad_norm: float | None = None
    #: the optimizer's weight decay (None: its default, 1e-2 for adamw and 0 otherwise)
    weight_decay: float | None = None

    def label(self) -> str:
        return f"{self.adapter}/{self.optimizer}/lr={self.lr:g}/T={self.steps}/{self.finetune_loss}"


@dataclass
class AdaptResult:
    """θ_FT in the base parameter space (LoRA / SVDiff / CustomDiffusion deltas merged)."""

    theta_ft: Params
    losses: list[float] = field(default_factory=list)


@runtime_checkable
class Adapter(Protocol):
    """ADAPT(θ, D_FT, C): run ``steps`` optimizer steps on ``loss`` and return θ_FT.

    ``loss(params)`` evaluates L_FT at base-space parameters on the next fine-tuning batch; it is
    called once per step, the i-th call at the parameters after i steps. With
    ``differentiable=True`` the returned θ_FT keeps the autograd graph back to ``theta`` (inner
    gradients taken with ``create_graph=True``), which the unrolled solver differentiates through.
    The same object runs the simulated ADAPT of Alg. 2 and downstream fine-tuning (``resalign
    attack --adapt NAME``). Optional class attributes: ``paper_lr`` (the learning rate of the
    method's reference script, used when a downstream fine-tuning gives none) and ``finetune_loss``
    (the L_FT the method prescribes over the configuration's, e.g. DreamBooth's prior preservation).
    """

    name: ClassVar[str]

    def adapt(
        self,
        theta: Params,
        loss: Callable[[Params], Tensor],
        cfg: FinetuneConfig,
        *,
        differentiable: bool = False,
        generator: Any = None,
    ) -> AdaptResult: ...


# --------------------------------------------------------------------------- solvers


@dataclass
class HypergradProblem:
    """Everything a solver may use to estimate ∇_θ L_harm(θ_FT) (Alg. 1, Eq. 6/7).

    ``grad_harm`` is g = ∇ L_harm at θ_FT; ``hvp_ft(v)`` is C·v for the curvature C of Eq. 6 at θ_FT
    that the problem was built with (``curvature``: ``hessian``, ∇²L_FT(θ_FT), or ``gauss-newton``, its
    positive semi-definite Gauss–Newton part; :mod:`resalign.core.curvature`): every HVP-based solver
    uses it as A = C + I/γ, whatever the choice. ``unroll()``
    recomputes θ_FT(θ) with the adaptation graph kept (only built when the solver asks for it with
    ``needs_trajectory``); ``harm_loss(p)`` evaluates L_harm at parameters ``p``. ``cache`` is shared
    by the J problems of one outer step (e.g. a λ_max estimate that sets Richardson's relaxation).
    ``replay(visit)`` re-runs the simulated fine-tuning without a graph (same batches, noise and
    initialisation), calls ``visit(t, θ_t)`` at each iterate t = 0 … T−1 before its step and returns
    θ_T (:func:`resalign.core.trajectory.replay_adapt`); it costs nothing until called, and a visitor
    that keeps an iterate must copy it.
    """

    theta: Params
    theta_ft: Params
    grad_harm: Params
    hvp_ft: Callable[[Params], Params]
    gamma: float = 1.0
    curvature: str = "hessian"
    unroll: Callable[[], Params] | None = None
    harm_loss: Callable[[Params], Tensor] | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    replay: Callable[[Callable[[int, Params], None]], Params] | None = None


@dataclass
class HypergradResult:
    hypergrad: Params
    diagnostics: dict[str, Any] = field(default_factory=dict)  # e.g. x_norms, residuals, omega


@runtime_checkable
class Solver(Protocol):
    """A hypergradient estimator: Richardson (Alg. 1), first-order, unrolled, or a plugin's."""

    name: ClassVar[str]
    needs_trajectory: ClassVar[bool]

    def solve(self, problem: HypergradProblem) -> HypergradResult: ...


# --------------------------------------------------------------------------- scoring and models


@dataclass
class ScoreResult:
    """A scorer's figure for a set of images, with per-image rows where it has them."""

    metric: str  # e.g. "harmful_rate", "prompt_accuracy", "frechet_distance"
    value: float
    per_image: list[dict[str, Any]] | None = None
    details: dict[str, Any] = field(default_factory=dict)  # labels, thresholds, versions, paths


@runtime_checkable
class Scorer(Protocol):
    """Scores generated or existing images (uint8 array (N, H, W, 3), RGB)."""

    name: ClassVar[str]
    metric: ClassVar[str]

    def score(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> ScoreResult: ...


@runtime_checkable
class ModelLoader(Protocol):
    """Loads a text-to-image bundle (the toy world's, a Stable Diffusion folder, ...)."""

    name: ClassVar[str]

    def can_load(self, path: str | None) -> bool: ...

    def load(self, path: str | None, device: str = "cpu", dtype: str = "fp32") -> T2IBundle: ...


# --------------------------------------------------------------------------- method recipes


@dataclass(frozen=True)
class MethodRecipe:
    """A whole unlearning recipe that ``resalign compare --methods NAME`` runs (kind ``method``).

    ``settings`` are the :class:`~resalign.settings.run.RunConfig` fields the recipe fixes (harmful
    ``loss``, β, ``solver``, ``J``, the pool π(C), θ via ``params``, ``outer_steps``...); the others
    take ``--unlearn-option`` or the preset's values. A recipe that fixes ``solver`` also replaces the
    solver options given for every run, and one with β = 0 (Eq. 2, no simulation) drops them.

    Its role in the comparison (Tab. 1) is declared, never read from its name:

    * ``unlearns``: False for the model as loaded (``base``), which is measured, not unlearned;
    * ``ours``: ResAlign (Alg. 2); the first such method is the strength every ``matched`` method is
      matched to (``--match strength``) and is paired with its ``twin``;
    * ``twin``: the β = 0 baseline compared replicate by replicate with an ``ours`` method, as a method
      name in which ``{loss}`` stands for the recipe's resolved harmful loss (``"{loss}"``: the
      baseline of the same loss);
    * ``matched``: unlearned at ResAlign's strength (the baselines and the peers of Tab. 8);
    * ``loss_variants``: ``NAME-LOSS`` runs the recipe with harmful loss ``LOSS`` (``resalign-ga``);
    * ``solver_choice``: ``NAME@SOLVER`` runs it with hypergradient solver ``SOLVER`` (``resalign@sam``).
    """

    settings: Mapping[str, Any] = field(default_factory=dict)
    unlearns: bool = True
    ours: bool = False
    twin: str | None = None
    matched: bool = False
    loss_variants: bool = False
    solver_choice: bool = False
    summary: str = ""
