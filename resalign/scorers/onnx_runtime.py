"""onnxruntime sessions of the ONNX scorers (NudeNet, ONNX classifiers, ONNX feature networks).

Providers are explicit (CUDA when onnxruntime has it, else CPU, unless the scorer's ``providers``
option names them); ``threads`` > 0 fixes the intra-op threads of each ``session.run`` (with one
inter-op thread), 0 leaves onnxruntime's default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from resalign.errors import ModelLoadError


def default_providers() -> list[str]:
    """CUDA then CPU when onnxruntime has CUDA, else CPU only."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_session(path: str | os.PathLike, *, providers: Sequence[str] = (), threads: int = 0, error: str):
    """An ``onnxruntime.InferenceSession`` of ``path``; a model onnxruntime cannot load raises
    :class:`ModelLoadError` ``"{error} {path}: {reason}"``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers) or default_providers())
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"{error} {path}: {exc}") from exc
