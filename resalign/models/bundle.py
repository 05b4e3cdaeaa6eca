"""A text-to-image bundle in diffusers layout: unet, text_encoder, tokenizer, scheduler, optional vae.

The same class serves a Stable Diffusion folder (latent space through the VAE), an SDXL-layout folder
(a second text encoder and tokenizer, ``text_encoder_2`` / ``tokenizer_2``, whose prompts condition
the UNet through a :class:`~resalign.components.Conditioning`) and the toy world (pixel space, no
VAE). Weights are read and written as safetensors only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from resalign.components import Cond, Conditioning
from resalign.errors import ModelLoadError
from resalign.models.diffusion import NoiseSchedule
from resalign.models.sdxl import check_sdxl_folder, is_sdxl_folder, weights_variant

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        from resalign.errors import ConfigError

        raise ConfigError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}") from None


@dataclass
class T2IBundle:
    """The pieces of a text-to-image diffusion model that resalign uses."""

    unet: Any  # diffusers.UNet2DConditionModel
    text_encoder: Any  # transformers.CLIPTextModel (frozen)
    tokenizer: Any
    scheduler: Any  # the sampling scheduler (DDIM / PNDM / ...)
    vae: Any | None = None  # AutoencoderKL for latent models, None in pixel space
    source: str = ""
    kind: str = "diffusers"  # "toy" for the embedded toy world
    text_encoder_2: Any | None = None  # SDXL: transformers.CLIPTextModelWithProjection (frozen)
    tokenizer_2: Any | None = None
    #: SDXL's ``force_zeros_for_empty_prompt`` (model_index.json), kept when the bundle is saved
    force_zeros_for_empty_prompt: bool = True

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def is_sdxl(self) -> bool:
        """Whether the UNet is conditioned as SDXL's: two text encoders, pooled embedding and time ids."""
        return self.text_encoder_2 is not None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return (self.unet.config.in_channels, size, size)

    @property
    def image_size(self) -> int:
        c, h, _ = self.latent_shape
        if self.vae is None:
            return h
        return h * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def noise_schedule(self) -> NoiseSchedule:
        from diffusers import DDPMScheduler

        return NoiseSchedule.from_scheduler(DDPMScheduler.from_config(self.scheduler.config))

    # ------------------------------------------------------------------ text and images
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], batch_size: int = 64, *,
                       original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0)) -> Cond:
        """The conditioning c of ``prompts``, on the UNet's device and dtype.

        One text encoder: its last hidden states (B, L, D). SDXL: a :class:`Conditioning` as
        ``StableDiffusionXLPipeline.encode_prompt`` builds it, both encoders' penultimate hidden states
        concatenated (B, L, D₁ + D₂), the second encoder's projected pooled output (B, P) and the time
        ids of :meth:`time_ids` (by default images generated at :attr:`image_size`, uncropped; training
        images give their size before resizing and their crop, ``original_size`` and ``crop_top_left``).
        """
        if self.text_encoder_2 is None:
            out = []
            for i in range(0, len(prompts), batch_size):
                out.append(self.text_encoder(self._token_ids(self.tokenizer, prompts[i : i + batch_size],
                                                             self.text_encoder))[0])
            return torch.cat(out).to(self.device, self.dtype)
        hidden, pooled = [], []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            states = []
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                out = encoder(self._token_ids(tokenizer, chunk, encoder), output_hidden_states=True)
                states.append(out.hidden_states[-2])
            hidden.append(torch.cat(states, dim=-1))
            pooled.append(out[0])  # the final encoder's projected pooled output (text_embeds)
        hidden_t = torch.cat(hidden).to(self.device, self.dtype)
        return Conditioning(hidden_t, torch.cat(pooled).to(self.device, self.dtype),
                            self.time_ids(hidden_t.shape[0], original_size, crop_top_left))

    def time_ids(self, n: int, original_size: tuple[int, int] | None = None,
                 crop_top_left: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """SDXL's micro-conditioning (original height, width, crop top, left, target height, width),
        (n, 6): images of :attr:`image_size` not resized from another size nor cropped, as
        ``StableDiffusionXLPipeline`` (and diffusers' ``train_text_to_image_sdxl.py`` for training
        images resized to the resolution) sets them by default."""
        size = (self.image_size, self.image_size)
        ids = [*(original_size or size), *crop_top_left, *size]
        return torch.tensor([ids], dtype=self.dtype, device=self.device).expand(n, 6).contiguous()

    @staticmethod
    def _token_ids(tokenizer: Any, prompts: list[str], encoder: Any) -> torch.Tensor:
        tok = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        return tok.input_ids.to(encoder.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> model space x_0 (VAE latents × scaling, or pixels).

        The latent is a sample of the VAE posterior drawn with ``generator`` (a fresh one seeded 0 when
        None), so the same images always give the same x_0.
        """
        images = images.to(self.device, self.dtype)
        if self.vae is None:
            return images
        if generator is None:
            generator = torch.Generator(device=self.vae.device).manual_seed(0)
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample(generator=generator)
        return (latents * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1]."""
        if self.vae is None:
            return x0.clamp(-1, 1)
        images = self.vae.decode((x0 / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return images.clamp(-1, 1)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> T2IBundle:
        """Move the models; in fp16 a VAE with ``force_upcast`` (SDXL's) stays fp32, as
        ``StableDiffusionXLPipeline`` decodes with it."""
        for m in (self.unet, self.text_encoder, self.text_encoder_2, self.vae):
            if m is None:
                continue
            keep = m is self.vae and dtype == torch.float16 and getattr(m.config, "force_upcast", False)
            m.to(device=device, dtype=dtype) if dtype is not None and not keep else m.to(device)
        return self

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike, unet_state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the bundle in diffusers layout (safetensors), atomically: a temp dir then a rename."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if unet_state is not None:
            self.unet.load_state_dict(unet_state, strict=False)
        self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        _save_transformers_model(self.text_encoder, tmp / "text_encoder")
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        if self.text_encoder_2 is not None:
            _save_transformers_model(self.text_encoder_2, tmp / "text_encoder_2")
            self.tokenizer_2.save_pretrained(tmp / "tokenizer_2")
        self.scheduler.save_pretrained(tmp / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        index = {
            "_class_name": "StableDiffusionPipeline" if self.vae is not None else "ResAlignToyPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
        }
        if self.text_encoder_2 is not None:
            index.update(
                _class_name="StableDiffusionXLPipeline",
                text_encoder_2=["transformers", type(self.text_encoder_2).__name__],
                tokenizer_2=["transformers", "CLIPTokenizer"],
                vae=["diffusers", "AutoencoderKL"],
                image_encoder=[None, None],
                feature_extractor=[None, None],
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            )
        elif self.vae is not None:
            index.update(
                vae=["diffusers", "AutoencoderKL"],
                safety_checker=[None, None],
                feature_extractor=[None, None],
                requires_safety_checker=False,
            )
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if path.exists():
            import shutil

            old = path.with_name(path.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str = "cpu", dtype: str = "fp32", kind: str = "diffusers"
    ) -> T2IBundle:
        """Load a diffusers-layout folder (a Stable Diffusion or SDXL checkpoint, a run's ``model/``, the
        toy model). Weights stored only as an ``fp16`` variant (``*.fp16.safetensors``) are read from
        it; with ``dtype="fp16"`` an SDXL VAE with ``force_upcast`` stays fp32. An SDXL folder's parts
        and their sizes are checked (:func:`~resalign.models.sdxl.check_sdxl_folder`) before any
        weight is read."""
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"model folder {str(path)!r} does not exist or is not a directory")
        missing = [p for p in REQUIRED if not (path / p).is_dir()]
        if missing:
            raise ModelLoadError(
                f"model folder {str(path)!r} lacks {', '.join(missing)}: expected a diffusers layout "
                "with unet/, text_encoder/, tokenizer/, scheduler/ (and vae/ for latent models)"
            )
        xl = is_sdxl_folder(path)
        if xl:
            check_sdxl_folder(path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import diffusers
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        torch_dtype = parse_dtype(dtype)

        def part(model_cls, name, **kw):
            return model_cls.from_pretrained(path / name, torch_dtype=kw.pop("torch_dtype", torch_dtype),
                                             variant=weights_variant(path / name), **kw)

        extra: dict[str, Any] = {}
        try:
            unet = part(UNet2DConditionModel, "unet")
            text_encoder = part(CLIPTextModel, "text_encoder")
            tokenizer = _load_tokenizer(path / "tokenizer")
            if xl:
                extra["text_encoder_2"] = part(CLIPTextModelWithProjection, "text_encoder_2")
                extra["tokenizer_2"] = _load_tokenizer(path / "tokenizer_2")
                index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
                extra["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", True))
            sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
            sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "DDIMScheduler"), None)
            if sched_cls is None:
                sched_cls = diffusers.DDIMScheduler
            scheduler = sched_cls.from_pretrained(path / "scheduler")
            vae = None
            if (path / "vae").is_dir():
                upcast = torch_dtype == torch.float16 and json.loads(
                    (path / "vae" / "config.json").read_text()).get("force_upcast", False)
                vae = part(AutoencoderKL, "vae", **({"torch_dtype": torch.float32} if upcast else {}))
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot load model folder {str(path)!r}: {exc}") from exc
        for m in (unet, text_encoder, extra.get("text_encoder_2"), vae):
            if m is not None:
                m.requires_grad_(False)
                m.eval()
        bundle = cls(unet, text_encoder, tokenizer, scheduler, vae, source=str(path), kind=kind, **extra)
        return bundle.to(device)


def _load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    tok_cls = CLIPTokenizer if (folder / "vocab.json").exists() else CLIPTokenizerFast
    return tok_cls.from_pretrained(folder)


def _save_transformers_model(model: Any, folder: Path) -> None:
    """``save_pretrained`` (config.json, model.safetensors) on every rank.

    While a torch.distributed process group exists, transformers writes a model's files on rank 0 only;
    a rank that computed a model alone (a cell of a sweep, :func:`resalign.distributed.solo`) writes it
    with safetensors itself.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        model.save_pretrained(folder, safe_serialization=True)
        return
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
