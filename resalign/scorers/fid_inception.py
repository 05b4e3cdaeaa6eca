"""pytorch-fid's Inception-v3 FID network, from a local weights file, as a feature extractor.

FID (App. B.3, [21]) is the Fréchet distance between Inception features of generated and real
images; the figures the field reports come from pytorch-fid's port of the TensorFlow network
(``pt_inception-2015-12-05-6726825d.pth``). This module builds that network from pytorch-fid's own
definitions (``FIDInceptionA/C/E_1/E_2`` patched into torchvision's Inception-v3, exactly as its
``fid_inception_v3``), loads the user's file with ``torch.load(weights_only=True)`` (or
safetensors) and never lets pytorch-fid fetch its weights. The feature block is pytorch-fid's
``--dims``: 64, 192, 768 or 2048 (the pool features, the standard FID).

Images go in as pytorch-fid feeds them: uint8 RGB divided by 255 (``ToTensor``), then the
network's own bilinear resize to 299 × 299 and scaling to [−1, 1]; spatial maps are average-pooled
to one vector per image, as pytorch-fid's ``get_activations`` does.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from resalign.errors import ConfigError, ModelLoadError
from resalign.scorers.images import check_images
from resalign.scorers.weights import auto_device, load_state_dict

#: pytorch-fid's ``--dims`` and the block each reads (``InceptionV3.BLOCK_INDEX_BY_DIM``).
FID_DIMS: tuple[int, ...] = (64, 192, 768, 2048)

#: The file pytorch-fid downloads; users pass their local copy.
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"

_EXPECTED = f"pytorch-fid's Inception-v3 FID weights ({FID_WEIGHTS_FILE}, a state dict)"

_BUILD_LOCK = threading.Lock()


def _pytorch_fid():
    try:
        from pytorch_fid import inception
    except ImportError as exc:
        raise ModelLoadError(
            "frechet.weights needs the pytorch-fid package for the FID Inception network: "
            "pip install 'resalign[fid]'"
        ) from exc
    return inception


def fid_inception_architecture():
    """pytorch-fid's FID Inception-v3 (``fid_inception_v3`` without its download), random weights."""
    import torchvision

    pf = _pytorch_fid()
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    return net


def load_fid_inception(path: str | os.PathLike, dims: int = 2048, *, option: str = "frechet.weights"):
    """pytorch-fid's ``InceptionV3([block of dims])`` with the weights of ``path``, in eval mode."""
    from unittest import mock

    if dims not in FID_DIMS:
        raise ConfigError(f"frechet.dims must be one of {', '.join(map(str, FID_DIMS))} (pytorch-fid's --dims), "
                          f"got {dims}")
    state = load_state_dict(path, option, _EXPECTED)
    pf = _pytorch_fid()
    net = fid_inception_architecture()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ModelLoadError(f"{option}: {Path(path).expanduser()} does not fit the FID Inception network "
                             f"({first}); expected {_EXPECTED}") from exc
    block = pf.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
    # InceptionV3 assembles its blocks from fid_inception_v3(); hand it the loaded network instead.
    with _BUILD_LOCK, mock.patch.object(pf, "fid_inception_v3", lambda: net):
        model = pf.InceptionV3([block], resize_input=True, normalize_input=True)
    return model.eval()


class FidInceptionExtractor:
    """Features (N, dims) of uint8 RGB images through pytorch-fid's Inception-v3."""

    def __init__(self, path: str | os.PathLike, dims: int = 2048, *, device: str = "", option: str = "frechet.weights"):
        import torch

        self.path = Path(path).expanduser()
        self.dims = int(dims)
        self.device = torch.device(auto_device(device))
        self.model = load_fid_inception(self.path, self.dims, option=option).to(self.device)
        self.name = f"pytorch-fid-inception:{self.path.name}:dims={self.dims}"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch
        from torch.nn.functional import adaptive_avg_pool2d

        images = check_images(images)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        x = x.to(self.device).float().div(255)
        with torch.no_grad():
            pred = self.model(x)[0]
        if pred.size(2) != 1 or pred.size(3) != 1:
            pred = adaptive_avg_pool2d(pred, output_size=(1, 1))
        return pred.squeeze(3).squeeze(2).cpu().numpy().astype(np.float64)
