"""Where the encoder runs at inference: eager PyTorch on a folded copy of its trunk, ONNX Runtime,
or OpenVINO, the last two on an ONNX export of the same weights. Training and fine-tuning always
use the PyTorch modules themselves; an engine only ever computes `Captioner.encode`.

`backend="auto"` takes the fastest engine installed for the device, in the order measured by
bench/bench_encoder.py: OpenVINO, then ONNX Runtime where the CPU has no native bf16 (with it,
PyTorch's bf16 autocast beats ONNX Runtime's fp32), then PyTorch. On CUDA it is PyTorch.
"""

from __future__ import annotations

import importlib.util
import threading

import torch

from ..model.encoders import Encoder
from ..model.runtime import autocast, autocast_dtype, native_cpu_bf16
from .folding import fold_trunk

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
EXTRAS = {"onnxruntime": "captioner[onnx]", "openvino": "captioner[openvino]"}


def installed(backend: str) -> bool:
    return backend == "torch" or importlib.util.find_spec(backend) is not None


def resolve_backend(backend: str, device: torch.device, precision: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        if device.type != "cpu":
            return "torch"
        if installed("openvino"):
            return "openvino"
        if installed("onnxruntime") and autocast_dtype(device, precision) is None:
            return "onnxruntime"
        return "torch"
    if backend != "torch":
        if device.type != "cpu":
            raise ValueError(f"backend {backend!r} runs on the CPU; device is {device}")
        if not installed(backend):
            raise ImportError(f"backend {backend!r} is not installed: pip install '{EXTRAS[backend]}'")
    return backend


class TorchEngine:
    """The encoder in PyTorch, with batch norm and TF-SAME padding folded (`fold`) into a copy of
    its trunk, under bf16/fp16 autocast where the hardware is native."""

    def __init__(self, encoder: Encoder, spatial: bool, device: torch.device, precision: str, fold: bool = True):
        self.encoder, self.spatial, self.device, self.precision = encoder, spatial, device, precision
        self.trunk = fold_trunk(encoder.trunk).to(device) if fold else None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            if self.trunk is None:
                return self.encoder(pixels, spatial=self.spatial).float()
            fmap = self.trunk(pixels.contiguous(memory_format=torch.channels_last))
            return (fmap if self.spatial else self.encoder.pool(fmap)).float()


class OnnxEngine:
    """The encoder's ONNX export in ONNX Runtime or OpenVINO; one inference at a time (a request
    object is not safe across threads, and the web app serves several)."""

    def __init__(self, encoder: Encoder, spatial: bool, backend: str, precision: str):
        from .onnx_export import cached_encoder_onnx

        path = str(cached_encoder_onnx(encoder, spatial))
        self.size, self.lock = encoder.transform.size, threading.Lock()
        if backend == "onnxruntime":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self._run = lambda x: session.run(None, {"pixels": x})[0]
        else:
            import openvino

            # bf16 only where the CPU computes it natively, as for PyTorch's autocast
            hint = "bf16" if precision == "auto" and native_cpu_bf16() else "f32"
            compiled = openvino.Core().compile_model(path, "CPU", {
                "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": torch.get_num_threads()})
            request = compiled.create_infer_request()
            self._run = lambda x: request.infer({0: x})[0].copy()  # the request reuses its output

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[1:]) != (3, self.size, self.size):
            raise ValueError(f"this encoder was exported for 3 x {self.size} x {self.size} pixels, "
                             f"not {tuple(pixels.shape[1:])}")
        x = pixels.detach().cpu().float().contiguous().numpy()
        with self.lock:
            return torch.from_numpy(self._run(x))


def build_engine(encoder: Encoder, spatial: bool, backend: str, device: torch.device, precision: str,
                 fold: bool = True):
    """A callable pixels -> features for `resolve_backend`'s answer."""
    if backend == "torch":
        return TorchEngine(encoder, spatial, device, precision, fold)
    return OnnxEngine(encoder, spatial, backend, precision)
