"""Downstream fine-tuning of a released (possibly unlearned) model, the way its users would do it.

This is the *evaluation* fine-tuning of the paper, not the simulated ADAPT of the meta loop: a real
``torch.nn.Module`` training loop with the diffusers example scripts' defaults (App. B.4): the UNet's
denoising loss ‖ε − ε_θ(x_t, t, c)‖², batch size 1, AdamW (β = 0.9/0.999, weight decay 1e-2,
ε = 1e-8), gradient-norm clipping at 1, constant learning rate, 200 steps. The text encoder stays
frozen, as in the UNet-only unlearning evaluated here.

Methods (``--adapt``; Sec. 4.1 "Fine-tuning Methods", App. B.2, field-anchors §4):

* ``full``: every UNet weight (``train_text_to_image.py``; lr 1e-5, the paper's default);
* ``lora``: rank-4 adapters on attention ``to_q/to_k/to_v/to_out.0`` through peft's
  ``unet.add_adapter(LoraConfig(...))`` (``train_text_to_image_lora.py``; lr 1e-4), merged for evaluation;
* ``svdiff``: every Conv2d/Linear weight re-parametrised as W = U·diag(ReLU(σ + δ))·Vᵀ from its own SVD,
  only the spectral shifts δ trained (mkshing/svdiff-pytorch; lr 1e-3);
* ``custom_diffusion``: the cross-attention key and value projections ``attn2.to_k/to_v`` only
  (``train_custom_diffusion.py``, ``crossattn_kv``; lr 1e-5);
* ``dreambooth``: the full UNet with prior preservation, L = L_inst + λ_prior·L_class on class images
  the model generated before fine-tuning (``train_dreambooth.py``; lr 5e-6, λ_prior = 1).

Every method exposes the fine-tuned weights *in the base parameter space* (:meth:`Finetuner.merged`):
the dict name → tensor of the original UNet's parameters, which :func:`resalign.eval.generate.generate`
evaluates through ``unet_params``. Stress tests of the paper run through the same loop:

* parameter-space escape (App. C.1, Tab. 11): L = L_FT(θ') − λ‖θ' − θ‖_p, with the distance taken in
  the base space between the fine-tuned and the released weights;
* contaminated data (Fig. 4) and staged relearning (Fig. 7) are data schedules (:class:`Stage`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from resalign.errors import ConfigError, DataError

#: The methods ``resalign attack --adapt`` accepts.
ADAPT_METHODS: tuple[str, ...] = ("full", "lora", "svdiff", "custom_diffusion", "dreambooth")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "sgd")

#: Learning rates of the reference scripts (App. B.2/B.4), used when ``lr`` is not given.
PAPER_LR: dict[str, float] = {
    "full": 1e-5,
    "lora": 1e-4,
    "svdiff": 1e-3,
    "custom_diffusion": 1e-5,
    "dreambooth": 5e-6,
}

#: LoRA target modules of diffusers' ``train_text_to_image_lora.py``.
LORA_TARGETS: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")


class PairData(Protocol):
    """Image-caption pairs: ``images`` uint8 (N, H, W, 3) RGB and ``prompts`` (N captions)."""

    images: np.ndarray
    prompts: list[str]


@dataclass
class Pairs:
    """A plain image-caption set (what :class:`PairData` describes)."""

    images: np.ndarray
    prompts: list[str]
    name: str = ""

    def __len__(self) -> int:
        return len(self.prompts)


def check_pairs(data: PairData, where: str) -> None:
    """Fail early, naming ``where``, when a data set is empty or its images and captions disagree."""
    images = getattr(data, "images", None)
    prompts = getattr(data, "prompts", None)
    if images is None or prompts is None:
        raise DataError(f"{where}: expected image-caption pairs with .images and .prompts")
    images = np.asarray(images)
    if len(prompts) == 0:
        raise DataError(f"{where}: no image-caption pairs")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 (N, H, W, 3) RGB, got {images.dtype} {images.shape}")
    if images.shape[0] != len(prompts):
        raise DataError(f"{where}: {images.shape[0]} images but {len(prompts)} captions")


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
    lr: float | None = None  # None: PAPER_LR[adapt]
    optimizer: str = "adamw"
    batch_size: int = 1
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    lora_rank: int = 4
    prior_loss_weight: float = 1.0
    num_class_images: int = 50
    class_prompt: str | None = None  # DreamBooth: None = each instance caption is its own class prompt
    escape_p: int | None = None  # parameter-space escape (Tab. 11): p in {1, 2}
    escape_lambda: float = 0.5

    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else PAPER_LR[self.adapt]

    def validate(self) -> FinetuneSpec:
        if self.adapt not in ADAPT_METHODS:
            raise ConfigError(f"--adapt {self.adapt!r}: expected one of {', '.join(ADAPT_METHODS)}")
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


# --------------------------------------------------------------------------- methods


class Method:
    """How one ADAPT method makes a UNet trainable and reads its weights back in the base space."""

    name: ClassVar[str]

    def __init__(self, spec: FinetuneSpec):
        self.spec = spec
        self._reference: dict[str, torch.Tensor] = {}

    def prepare(self, unet: nn.Module, *, keep_reference: bool) -> list[nn.Parameter]:
        """Make ``unet`` (a private copy) trainable the method's way; return the trained parameters."""
        raise NotImplementedError

    def merged(self, unet: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The fine-tuned weights under the original UNet's parameter ``names`` (detached)."""
        return {n: _lookup(unet, n).detach() for n in names}

    def deltas(self, unet: nn.Module) -> list[torch.Tensor]:
        """θ' − θ in the base space, differentiable (the escape term's distance)."""
        return [_lookup(unet, n) - ref for n, ref in self._reference.items()]

    def _select(self, unet: nn.Module, keep: Callable[[str], bool], keep_reference: bool) -> list[nn.Parameter]:
        unet.requires_grad_(False)
        chosen = []
        for n, p in unet.named_parameters():
            if keep(n):
                p.requires_grad_(True)
                chosen.append(p)
                if keep_reference:
                    self._reference[n] = p.detach().clone()
        return chosen


def _lookup(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


class FullMethod(Method):
    name = "full"

    def prepare(self, unet, *, keep_reference):
        return self._select(unet, lambda n: True, keep_reference)


class DreamBoothMethod(FullMethod):
    """Full UNet; the prior-preservation term is added by the loop (it needs the class data)."""

    name = "dreambooth"


class CustomDiffusionMethod(Method):
    """Cross-attention key/value projections only (``crossattn_kv``)."""

    name = "custom_diffusion"

    def prepare(self, unet, *, keep_reference):
        params = self._select(
            unet, lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n, keep_reference
        )
        if not params:
            raise ConfigError("--adapt custom_diffusion: this UNet has no cross-attention attn2.to_k/to_v layers")
        return params


class LoraMethod(Method):
    """peft LoRA (rank r, α = r, Gaussian init of A and zero B) on the attention projections."""

    name = "lora"

    def prepare(self, unet, *, keep_reference):
        from peft import LoraConfig

        unet.requires_grad_(False)
        r = self.spec.lora_rank
        unet.add_adapter(
            LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
        )
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        if not params:
            raise ConfigError("--adapt lora: no attention projections (to_q/to_k/to_v/to_out.0) to adapt")
        for p in params:
            p.requires_grad_(True)
        return params

    @staticmethod
    def _lora_layers(unet: nn.Module):
        from peft.tuners.lora import LoraLayer

        return [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)]

    def merged(self, unet, names):
        layers = dict(self._lora_layers(unet))
        out = {}
        for n in names:
            owner, _, leaf = n.rpartition(".")
            layer = layers.get(owner)
            if layer is None:
                out[n] = _lookup(unet, n).detach()
                continue
            base = getattr(layer.get_base_layer(), leaf).detach()
            if leaf == "weight":
                base = base + sum(
                    layer.get_delta_weight(a).detach() for a in layer.active_adapters
                ).to(base.dtype)
            out[n] = base
        return out

    def deltas(self, unet):
        return [
            layer.get_delta_weight(a) for _, layer in self._lora_layers(unet) for a in layer.active_adapters
        ]


class _SpectralShift(nn.Module):
    """W(δ) = U·diag(ReLU(σ + δ))·Vᵀ, reshaped to the weight's shape (SVDiff)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        shape = weight.shape
        u, s, vh = torch.linalg.svd(weight.detach().reshape(shape[0], -1).float(), full_matrices=False)
        self.shape = tuple(shape)
        self.register_buffer("u", u.to(weight.dtype))
        self.register_buffer("s", s.to(weight.dtype))
        self.register_buffer("vh", vh.to(weight.dtype))
        self.delta = nn.Parameter(torch.zeros_like(self.s))

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return ((self.u * torch.relu(self.s + self.delta)) @ self.vh).reshape(self.shape)


class SvdiffMethod(Method):
    """Spectral shifts of every Conv2d/Linear weight; W(0) reproduces W up to the SVD's rounding."""

    name = "svdiff"

    def prepare(self, unet, *, keep_reference):
        from torch.nn.utils import parametrize

        unet.requires_grad_(False)
        self._shifts: dict[str, _SpectralShift] = {}
        for mname, mod in list(unet.named_modules()):
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.weight.ndim >= 2:
                shift = _SpectralShift(mod.weight)
                parametrize.register_parametrization(mod, "weight", shift, unsafe=True)
                self._shifts[f"{mname}.weight"] = shift
                if keep_reference:
                    self._reference[f"{mname}.weight"] = mod.parametrizations.weight.original.detach()
        if not self._shifts:
            raise ConfigError("--adapt svdiff: no Conv2d/Linear weights to re-parametrise")
        return [s.delta for s in self._shifts.values()]


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (FullMethod, LoraMethod, SvdiffMethod, CustomDiffusionMethod, DreamBoothMethod)
}


# --------------------------------------------------------------------------- data in model space


def _resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bilinear) and centre-crop, as the diffusers scripts do."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    out = np.empty((images.shape[0], size, size, 3), np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img)
        w, h = pil.size
        scale = size / min(w, h)
        pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = pil.size
        left, top = (w - size) // 2, (h - size) // 2
        out[i] = np.asarray(pil.crop((left, top, left + size, top + size)).convert("RGB"))
    return out


@dataclass
class _Encoded:
    x0: torch.Tensor  # (N, C, h, w) model space
    cond: torch.Tensor  # (N, L, D)
    name: str = ""


def encode_pairs(bundle: Any, data: PairData, *, prompts: Sequence[str] | None = None, batch: int = 16) -> _Encoded:
    """Images to model space x_0 (VAE latents or pixels) and captions to text embeddings c, once."""
    images = _resize_square(np.asarray(data.images), bundle.image_size)
    caps = list(prompts) if prompts is not None else list(data.prompts)
    xs, generator = [], torch.Generator(device=bundle.device).manual_seed(0)  # the VAE posterior's sample
    for i in range(0, len(images), batch):
        t = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        xs.append(bundle.encode_images(t, generator).float())
    return _Encoded(torch.cat(xs), bundle.encode_prompts(caps).float(), getattr(data, "name", ""))


class _Batches:
    """Epoch-shuffled mini-batches of one encoded set (seeded), as a DataLoader with shuffle=True."""

    def __init__(self, enc: _Encoded, batch_size: int, rng: np.random.Generator):
        self.enc, self.batch_size, self.rng = enc, batch_size, rng
        self.order: list[int] = []

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = []
        while len(idx) < self.batch_size:
            if not self.order:
                self.order = list(self.rng.permutation(self.enc.x0.shape[0]))
            idx.append(self.order.pop())
        return self.enc.x0[idx], self.enc.cond[idx]


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

    The bundle itself is never modified: training happens on a private float32 copy of the UNet, and
    :meth:`merged` hands out the fine-tuned weights for the original one (``unet_params`` of
    :func:`~resalign.eval.generate.generate`, or :meth:`T2IBundle.save` with ``unet_state``).
    ``class_generation`` holds the sampling settings (``steps``, ``guidance``) of DreamBooth's class
    images when they are generated.
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
            check_pairs(prior, "DreamBooth prior-preservation data")
        self.stages = list(stages)
        self.seed = int(seed)
        self.prior_data = prior
        self.names = [n for n, _ in bundle.unet.named_parameters()]
        self.method = METHODS[spec.adapt](spec)
        self.log = FinetuneLog()
        self._unet: nn.Module | None = None

    @property
    def total_steps(self) -> int:
        return sum(st.steps for st in self.stages)

    # -------------------------------------------------------------- setup
    def _setup(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        unet = copy.deepcopy(self.bundle.unet)
        if self.bundle.dtype != torch.float32:  # train in float32, as mixed-precision scripts keep master weights
            unet = unet.to(torch.float32)
        unet.train()
        with torch.random.fork_rng(devices=[]):  # LoRA's Gaussian init from the run's seed, global RNG untouched
            torch.manual_seed(self.seed)
            params = self.method.prepare(unet, keep_reference=self.spec.escape_p is not None)
        lr = self.spec.resolved_lr()
        if self.spec.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr)
        else:
            kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8)
            if self.spec.optimizer == "adamw":
                cls, kw = torch.optim.AdamW, {**kw, "weight_decay": self.spec.weight_decay}
            else:
                cls = torch.optim.Adam
            # The fused kernel (CPU and CUDA, float32) computes the same update several times faster.
            fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
            opt = cls(params, **kw, fused=fused or None)
        self._unet = unet
        return unet, opt

    def _prior(self) -> _Encoded | None:
        if self.spec.adapt != "dreambooth":
            return None
        if self.prior_data is not None:
            return encode_pairs(self.bundle, self.prior_data)
        # Class images from the model before fine-tuning (train_dreambooth.py's --with_prior_preservation).
        from resalign.eval.generate import generate

        first = self.stages[0].data
        n = max(1, self.spec.num_class_images)
        if self.spec.class_prompt:
            prompts = [self.spec.class_prompt] * n
        else:
            caps = list(first.prompts)
            prompts = [caps[i % len(caps)] for i in range(n)]
        images = generate(self.bundle, prompts, seed=10_000 + self.seed, **self.class_generation)
        return encode_pairs(self.bundle, Pairs(images, prompts, "class"))

    # -------------------------------------------------------------- public
    def merged(self) -> dict[str, torch.Tensor]:
        """The current fine-tuned weights in the base space, in the bundle's dtype (detached)."""
        if self._unet is None:
            raise RuntimeError("Finetuner.merged() before run()")
        dtype = self.bundle.dtype
        return {n: t.to(dtype) for n, t in self.method.merged(self._unet, self.names).items()}

    def run(
        self,
        *,
        eval_every: int = 0,
        on_eval: EvalFn | None = None,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Train through every stage; evaluate at step 0, every ``eval_every`` steps and at the end."""
        unet, opt = self._setup()
        device = self.bundle.device
        schedule = self.bundle.noise_schedule()
        gen = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        encoded = [encode_pairs(self.bundle, st.data) for st in self.stages]
        prior = self._prior()
        prior_batches = _Batches(prior, self.spec.batch_size, rng) if prior is not None else None
        trainable = [p for g in opt.param_groups for p in g["params"]]
        total = self.total_steps
        evaluated: set[int] = set()

        def maybe_eval(step: int, force: bool = False) -> None:
            if on_eval is None or step in evaluated:
                return
            if force or step == 0 or (eval_every > 0 and step % eval_every == 0):
                evaluated.add(step)
                unet.eval()
                on_eval(step, self.merged())
                unet.train()

        maybe_eval(0)
        step = 0
        for st, enc in zip(self.stages, encoded):
            batches = _Batches(enc, self.spec.batch_size, rng)
            for _ in range(st.steps):
                x0, cond = batches.next()
                loss = self._denoise_loss(unet, schedule, x0, cond, gen, device)
                if prior_batches is not None:
                    px0, pcond = prior_batches.next()
                    loss = loss + self.spec.prior_loss_weight * self._denoise_loss(
                        unet, schedule, px0, pcond, gen, device
                    )
                total_loss = loss
                if self.spec.escape_p is not None:
                    dist = _lp_distance(self.method.deltas(unet), self.spec.escape_p)
                    total_loss = loss - self.spec.escape_lambda * dist
                    self.log.distances.append(float(dist.detach()))
                opt.zero_grad(set_to_none=True)
                total_loss.backward()
                if self.spec.max_grad_norm and self.spec.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, self.spec.max_grad_norm)
                opt.step()
                step += 1
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"fine-tuning diverged at step {step} (loss {value}); lower --lr (now {self.spec.resolved_lr():g})"
                    )
                self.log.losses.append(value)
                self.log.stages.append(st.name)
                if progress is not None:
                    progress(step, total, value)
                maybe_eval(step)
        maybe_eval(step, force=True)
        unet.eval()
        return self.merged()

    @staticmethod
    def _denoise_loss(unet, schedule, x0, cond, gen, device) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=gen)
        x0, noise, t, cond = x0.to(device), noise.to(device), t.to(device), cond.to(device)
        x_t = schedule.add_noise(x0, noise, t)
        pred = unet(x_t, t, encoder_hidden_states=cond).sample
        return ((pred.float() - noise) ** 2).mean()


def _lp_distance(deltas: Sequence[torch.Tensor], p: int) -> torch.Tensor:
    """‖θ' − θ‖_p over all trained weights (zero-safe: the gradient at 0 is 0)."""
    if not deltas:
        return torch.zeros(())
    parts = torch.stack([torch.linalg.vector_norm(d.float(), ord=p) for d in deltas])
    return torch.linalg.vector_norm(parts, ord=p)


def contaminate(
    benign: PairData, harmful: PairData, ratio: float, *, seed: int = 0, name: str = ""
) -> Pairs:
    """Replace a ``ratio`` share of ``benign``'s pairs with random ``harmful`` pairs (Fig. 4, App. B.2).

    The set keeps its size; ratio 0 is the clean set and 1 is all harmful.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"--contaminate {ratio}: expected a ratio between 0 and 1")
    check_pairs(benign, "fine-tuning data")
    check_pairs(harmful, "--harmful-data")
    n = len(benign.prompts)
    k = int(round(ratio * n))
    rng = np.random.default_rng(seed)
    clean, dirty = _resize_like(np.asarray(benign.images), np.asarray(harmful.images))
    replace = rng.choice(n, size=k, replace=False) if k else np.array([], int)
    source = rng.choice(len(harmful.prompts), size=k, replace=k > len(harmful.prompts))
    out_images = clean.copy()
    prompts = list(benign.prompts)
    for i, j in zip(replace, source):
        out_images[i] = dirty[j]
        prompts[i] = harmful.prompts[j]
    return Pairs(out_images, prompts, name or f"{getattr(benign, 'name', '') or 'data'}+{ratio:g}harmful")


def _resize_like(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring two image sets to one square size (the smaller of the two) so they can be mixed."""
    size = min(a.shape[1], a.shape[2], b.shape[1], b.shape[2])
    return _resize_square(a, size), _resize_square(b, size)
