"""Shared pytest configuration: one CPU thread, offline hub, fixtures from tests/fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the compiled inner loop (resalign.core.compiled) compiles each model and input shape once per
# process: for the suite's many small models that costs more than it saves. tests/test_compiled.py
# and the equality tests of the compiled path turn it on.
os.environ.setdefault("RESALIGN_COMPILE", "0")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny_ctx():
    """A DiffusionContext around a random-init tiny UNet (fp32)."""
    from fixtures.tiny import tiny_context

    return tiny_context()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A Stable-Diffusion-shaped diffusers folder (UNet, AutoencoderKL, CLIP text encoder, tokenizer)."""
    from fixtures.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    """The same with the SD 2.x layout's linear projections, per-block head dimensions, 3 text layers."""
    from fixtures.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd2") / "tiny-sd2", sd2=True)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """An SDXL-shaped folder: two CLIP text encoders of different widths, a ``text_time`` UNet, a VAE."""
    from fixtures.tiny_sd import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_toy_dir(tmp_path_factory):
    """An untrained toy-world model folder with 8/16 channels (the toy preset's code path, fast)."""
    from fixtures.tiny_toy import build_tiny_toy

    return build_tiny_toy(tmp_path_factory.mktemp("tiny-toy") / "model")


@pytest.fixture
def no_network(monkeypatch):
    """Fail any connection attempt and put the model hubs offline (scorers must read local files only)."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny randomly initialised transformers CLIP folder (``save_pretrained``)."""
    from fixtures.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")
