"""Training and checks of the toy world's text-to-image model from scratch (``resalign toy pretrain``).

:func:`train_base_model` trains the toy UNet and text encoder jointly on procedural data (AdamW with
warm-up and cosine decay, EMA weights, Min-SNR loss weighting, caption dropout for classifier-free
guidance); :func:`measure` gives the world's headline figures with the toy classifiers;
:func:`classifier_accuracy` and :func:`onnx_torch_max_diff` check the ONNX classifiers;
:func:`autograd_cost` times a gradient against a Hessian-vector product of the denoising loss.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from resalign.data import toy as world

#: ``progress(stage, done, total, info)``: stage is "harm classifier", "shape/colour classifier",
#: "base model" or "checks"; ``info`` carries the latest loss and check figures.
Progress = Callable[[str, int, int, dict], None]


@dataclass
class PretrainConfig:
    """Settings of ``resalign toy pretrain`` (the defaults produced the shipped assets)."""

    seed: int = 0
    steps: int = 3600  # base model optimizer steps
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    ema: float = 0.995
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (0 disables)
    p_uncond: float = 0.1  # empty captions, for classifier-free guidance
    p_drop_colour: float = 0.2  # captions without the colour word
    pool: int = 40000  # procedurally drawn training images
    channels: tuple[int, int] = (32, 64)
    classifier_steps: int = 2500
    classifier_pool: int = 12000
    check_every: int = 600  # quick checks during training (0: none)
    check_samples: int = 80
    eval_samples: int = 240  # images per figure in the final checks
    sample_steps: int = 20
    guidance: float = 2.0  # classifier-free guidance of the checks (the toy model oversaturates above ~3)
    threads: int = 1

    def __post_init__(self):
        self.channels = tuple(self.channels)


# --------------------------------------------------------------------------- base model training


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class _Ema:
    """Exponential moving average of a module's parameters, held in a copy of the module."""

    def __init__(self, module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self._src = [p for p in module.parameters()]
        self._dst = [p for p in self.module.parameters()]

    def update(self, step: int) -> None:
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self._dst, [p.detach() for p in self._src], 1 - d)


def train_base_model(
    cfg: PretrainConfig,
    check: Callable[[Any, int], dict] | None = None,
    progress: Progress | None = None,
    log: Callable[[dict], None] | None = None,
):
    """Train the toy UNet and text encoder jointly on procedural data; returns the EMA bundle.

    ``check(bundle, step)`` runs every ``cfg.check_every`` steps on the EMA model (and its figures are
    logged); ``log(row)`` receives one dict per logged step.
    """
    import torch

    from resalign.models.bundle import T2IBundle
    from resalign.models.toy import build_bundle, build_schedulers

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 101)
    data = world.make_dataset(cfg.pool, seed=cfg.seed + 202)
    x_all = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    style = world.CaptionStyle(p_drop_colour=cfg.p_drop_colour)

    bundle = build_bundle(seed=cfg.seed, channels=cfg.channels)
    unet, text = bundle.unet, bundle.text_encoder
    unet.train().requires_grad_(True)
    text.train().requires_grad_(True)
    ddpm, _ = build_schedulers()
    alphas = ddpm.alphas_cumprod.float()
    params = [p for p in unet.parameters()] + [p for p in text.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    ema_unet, ema_text = _Ema(unet, cfg.ema), _Ema(text, cfg.ema)
    ema_bundle = T2IBundle(ema_unet.module, ema_text.module, bundle.tokenizer, bundle.scheduler,
                           source="toy", kind="toy")
    tok = bundle.tokenizer
    gen = torch.Generator().manual_seed(cfg.seed + 303)
    t0 = time.time()
    running = None
    for step in range(cfg.steps):
        idx = rng.integers(0, len(data), cfg.batch_size)
        captions = [
            "" if rng.random() < cfg.p_uncond else world.training_caption(data.scenes[i], rng, style) for i in idx
        ]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        x0 = x_all[torch.from_numpy(idx)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0:
            snr = alphas[t] / (1 - alphas[t])
            per = per * torch.clamp(snr, max=cfg.min_snr_gamma) / snr
        loss = per.mean()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(step)
        ema_text.update(step)
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        info: dict[str, Any] = {"loss": running}
        done = step + 1
        if check is not None and cfg.check_every and (done % cfg.check_every == 0 or done == cfg.steps):
            info.update(check(ema_bundle, done))
        if log is not None and (done % 50 == 0 or len(info) > 1):
            log({"step": done, "loss": running, "lr": _lr_at(step, cfg), "elapsed_s": round(time.time() - t0, 1),
                 **{k: v for k, v in info.items() if k != "loss"}})
        if progress is not None:
            progress("base model", done, cfg.steps, info)
    ema_bundle.unet.eval()
    ema_bundle.text_encoder.eval()
    ema_bundle.source = "toy"
    return ema_bundle


# --------------------------------------------------------------------------- checks


@dataclass
class Checks:
    """Figures measured on a toy model with the toy classifiers."""

    figures: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def measure(
    bundle,
    harm_classifier: str = "",
    shape_colour_classifier: str = "",
    n: int = 240,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 2.0,
    batch_size: int = 120,
    progress: Callable[[int, int], None] | None = None,
    frechet: bool = True,
) -> Checks:
    """The toy world's headline figures for ``bundle``, ``n`` images per figure.

    * ``harmful_rate/harmful``: harm rate on explicit harmful prompts;
    * ``harmful_rate/implicit``: harm rate on implicit prompts (context words, shape not named);
    * ``harmful_rate/neutral``: harm rate on "a <colour> shape" prompts (the benign background rate);
    * ``harmful_rate/preservation`` and ``prompt_accuracy/preservation``: on benign prompts;
    * ``frechet_distance/preservation``: toy Fréchet distance of the benign-prompt images.
    """
    from resalign.eval.scoring.generate import generate
    from resalign.scorers.toy import ToyFrechetScorer, ToyHarmScorer, ToyPromptAccuracyScorer

    t0 = time.time()
    harm = ToyHarmScorer(ToyHarmScorer.Config(classifier=harm_classifier))
    acc = ToyPromptAccuracyScorer(ToyPromptAccuracyScorer.Config(classifier=shape_colour_classifier))
    sets = {
        "harmful": world.harmful_prompts(n, seed=seed),
        "implicit": world.implicit_prompts(n, seed=seed + 1),
        "neutral": world.neutral_prompts(n, seed=seed + 2),
        "preservation": world.preservation_prompts(n, seed=seed + 3),
    }
    total = sum(len(p) for p in sets.values())
    done = 0
    out = Checks()
    for i, (name, prompts) in enumerate(sets.items()):
        def step(k: int, _t: int, _d=done) -> None:
            if progress is not None:
                progress(_d + k, total)

        images = generate(bundle, prompts, steps=steps, guidance=guidance, seed=seed * 100003 + i * 10007,
                          batch_size=batch_size, progress=step)
        done += len(prompts)
        out.figures[f"harmful_rate/{name}"] = harm.score(images).value
        out.counts[f"harmful_rate/{name}"] = len(images)
        if name == "preservation":
            out.figures["prompt_accuracy/preservation"] = acc.score(images, prompts).value
            out.counts["prompt_accuracy/preservation"] = len(images)
            if frechet:
                fd = ToyFrechetScorer(ToyFrechetScorer.Config(classifier=shape_colour_classifier))
                out.figures["frechet_distance/preservation"] = fd.score(images).value
                out.counts["frechet_distance/preservation"] = len(images)
    out.seconds = time.time() - t0
    return out


def classifier_accuracy(harm_path: str, shape_colour_path: str, n: int = 2000, seed: int = 999) -> dict[str, float]:
    """Accuracy of the ONNX classifiers on held-out procedural images (a seed never used in training)."""
    from resalign.models.toy_classifiers import OnnxToyClassifier, labelled_images

    images, scenes = labelled_images(n, seed, harm_share=0.5)
    p = OnnxToyClassifier(harm_path)(images)["harm_probability"]
    harm_acc = float(np.mean((p > 0.5) == np.array([s.shape == world.HARMFUL_SHAPE for s in scenes])))
    images, scenes = labelled_images(n, seed + 1)
    logits = OnnxToyClassifier(shape_colour_path)(images)["logits"]
    ns = len(world.SHAPES)
    shape_ok = logits[:, :ns].argmax(1) == np.array([world.SHAPES.index(s.shape) for s in scenes])
    colour_ok = logits[:, ns:].argmax(1) == np.array([world.COLOUR_NAMES.index(s.colour) for s in scenes])
    return {
        "harm_classifier_accuracy": harm_acc,
        "shape_accuracy": float(shape_ok.mean()),
        "colour_accuracy": float(colour_ok.mean()),
        "shape_and_colour_accuracy": float((shape_ok & colour_ok).mean()),
    }


def onnx_torch_max_diff(model, kind: str, path: str, n: int = 256, seed: int = 4242) -> float:
    """Largest absolute difference between the ONNX export's and torch's outputs on procedural images."""
    from resalign.models.toy_classifiers import OnnxToyClassifier, augment, labelled_images, predict_torch

    images, _ = labelled_images(n, seed, harm_share=0.5)
    images = augment(images, np.random.default_rng(seed))
    a = predict_torch(model, images, kind)
    b = OnnxToyClassifier(path)(images)
    return float(max(np.abs(a[k] - b[k]).max() for k in a))


def world_description(cfg: PretrainConfig | None = None) -> dict[str, Any]:
    """The world's vocabulary and roles (and the settings that trained the model, when given)."""
    desc: dict[str, Any] = {
        "image_size": world.IMAGE_SIZE,
        "shapes": list(world.SHAPES),
        "colours": {k: list(v) for k, v in world.COLOURS.items()},
        "backgrounds": {k: list(v) for k, v in world.BACKGROUNDS.items()},
        "sizes": list(world.SIZES),
        "positions": list(world.POSITIONS),
        "context_words": list(world.CONTEXT_WORDS),
        "harmful_shape": world.HARMFUL_SHAPE,
        "benign_shapes": list(world.BENIGN_SHAPES),
        "grammar": "a [small|large] [shiny|glowing] <colour> <shape|shape> [on <background>] [at <position>]",
    }
    if cfg is not None:
        desc["pretrain"] = asdict(cfg)
    return desc


def autograd_cost(bundle=None, batch_size: int = 8, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Seconds per gradient and per Hessian-vector product of the denoising loss w.r.t. all UNet weights.

    Double backward runs under PyTorch's math attention backend (the fused CPU/GPU kernels lack it).
    Returns the median times, their ratio and the parameter count.
    """
    import torch
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from resalign.models.toy import build_bundle

    bundle = bundle if bundle is not None else build_bundle(seed=seed)
    unet = bundle.unet
    params = {k: v.detach().clone().requires_grad_(True) for k, v in unet.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    c, h, w = bundle.latent_shape
    x0 = torch.randn(batch_size, c, h, w, generator=g)
    noise = torch.randn(batch_size, c, h, w, generator=g)
    t = torch.randint(0, 1000, (batch_size,), generator=g)
    cond = bundle.encode_prompts(world.harmful_prompts(batch_size))
    sched = bundle.noise_schedule()
    xt = sched.add_noise(x0, noise, t)
    v = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}

    def loss_fn(p):
        pred = functional_call(unet, p, (xt, t), {"encoder_hidden_states": cond}).sample
        return ((pred - noise) ** 2).mean()

    def grad_once():
        return torch.autograd.grad(loss_fn(params), list(params.values()))

    def hvp_once():
        gr = torch.autograd.grad(loss_fn(params), list(params.values()), create_graph=True)
        return torch.autograd.grad(gr, list(params.values()), grad_outputs=list(v.values()))

    times = {}
    with sdpa_kernel(SDPBackend.MATH):
        for name, fn in (("grad_s", grad_once), ("hvp_s", hvp_once)):
            fn()
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t0)
            times[name] = float(np.median(runs))
    times["hvp_over_grad"] = times["hvp_s"] / times["grad_s"]
    times["unet_params"] = float(sum(p.numel() for p in params.values()))
    times["batch_size"] = float(batch_size)
    return times
