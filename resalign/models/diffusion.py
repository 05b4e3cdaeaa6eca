"""The forward diffusion process q(x_t | x_0) as the losses see it (``components.Schedule``)."""

from __future__ import annotations

from typing import Any

import torch


class NoiseSchedule:
    """DDPM forward process from a diffusers training scheduler's ``alphas_cumprod``.

    ``add_noise`` is x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (epsilon prediction, as SD v1.x and the toy model).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type != "epsilon":
            raise NotImplementedError(f"prediction_type {prediction_type!r}: only 'epsilon' is supported")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32)
        self.num_train_timesteps = int(alphas_cumprod.shape[0])

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        return cls(scheduler.alphas_cumprod, getattr(scheduler.config, "prediction_type", "epsilon"))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def sample(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        return noise, t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones(t.shape[0], dtype=torch.float32, device=t.device)
