"""ONNX graphs of a captioner: the encoder (which ONNX Runtime and OpenVINO run as backends), and
the decoder's start and step, so that a deployment can caption without PyTorch (onnx_captioner.py).

The encoder is exported unfolded: both engines fold batch norm and padding into their own kernels.
Graphs have a dynamic batch; the image size is the checkpoint's (its TF-SAME padding depends on it).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from ..data.atomic import atomic_file
from ..model.decoder import CaptionDecoder
from ..model.encoders import Encoder
from .onnx_captioner import FILES, SHARED_WEIGHTS

OPSET = 17
ENGINE_CACHE = Path("~/.cache/captioner/onnx")


class EncoderGraph(nn.Module):
    def __init__(self, encoder: Encoder, spatial: bool):
        super().__init__()
        self.encoder, self.spatial = encoder, spatial

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels, spatial=self.spatial).float()


class StartGraph(nn.Module):
    """features -> the LSTM's (h, c) after the image and the evidence bias on the word logits."""

    def __init__(self, decoder: CaptionDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: torch.Tensor):
        (h, c), _, bias = self.decoder.start(features)
        if bias is None:
            bias = features.new_zeros(1, features.size(0), self.decoder.config.vocab_size)
        return h, c, bias[0]


class StepGraph(nn.Module):
    """(tokens, h, c, bias) -> (word logits with the bias added, h, c)."""

    def __init__(self, decoder: CaptionDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor, bias: torch.Tensor):
        logits, ((h, c), _, _) = self.decoder.step(tokens, ((h, c), None, None))
        return logits.float() + bias, h, c


def _export(module: nn.Module, args: tuple, path: Path, inputs: dict[str, dict], outputs: dict[str, dict]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's notes on traced shapes
        torch.onnx.export(module.eval(), args, str(path), input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes={**inputs, **outputs}, opset_version=OPSET, dynamo=False)
    return path


def export_encoder(encoder: Encoder, path: str | Path, spatial: bool = False) -> Path:
    size = encoder.transform.size
    batch = {0: "batch"}
    with torch.no_grad():
        return _export(EncoderGraph(encoder, spatial), (torch.zeros(1, 3, size, size),), Path(path),
                       {"pixels": batch}, {"features": batch})


def export_decoder(decoder: CaptionDecoder, directory: str | Path) -> list[Path]:
    """decoder_start.onnx and decoder_step.onnx, and the weights both use in one file beside them;
    a single decoder on pooled features only."""
    if not isinstance(decoder, CaptionDecoder) or decoder.config.takes_map:
        raise ValueError("ONNX export of the decoder needs a single decoder on pooled features "
                         "(keep one ensemble member with --members 1; attention decoders are not exported)")
    if decoder.config.cell != "lstm":
        raise ValueError(f"ONNX export of the decoder supports the LSTM cell only; this decoder's cell is "
                         f"{decoder.config.cell.upper()} (it captions with PyTorch)")
    c, directory = decoder.config, Path(directory)
    features = torch.zeros(2, c.feature_dim)
    state = torch.zeros(c.num_layers, 2, c.hidden_dim)
    batch, state_axes = {0: "batch"}, {1: "batch"}
    # nn.LSTM exports as ONNX's own LSTM operator; StepWeights' V x 4H table would add 45 MB.
    folded, decoder.fold_step = decoder.fold_step, False
    try:
        with torch.no_grad():
            start = _export(StartGraph(decoder), (features,), directory / FILES["start"], {"features": batch},
                            {"h": state_axes, "c": state_axes, "bias": batch})
            step = _export(StepGraph(decoder), (torch.full((2,), 4), state, state, torch.zeros(2, c.vocab_size)),
                           directory / FILES["step"], {"tokens": batch, "h_in": state_axes, "c_in": state_axes,
                                                       "bias": batch},
                           {"logits": batch, "h": state_axes, "c": state_axes})
    finally:
        decoder.fold_step = folded
    shared = share_initializers([start, step], directory / SHARED_WEIGHTS)
    return [start, step] + ([shared] if shared else [])


def share_initializers(paths: list[Path], data: Path, alignment: int = 4096) -> Path | None:
    """Moves the initializers that several graphs hold byte for byte (the start and the step both
    run the LSTM: 21 MB of the built-in model's) into one external data file that each graph points
    into, so that a deployment stores and downloads them once. ONNX Runtime resolves the file beside
    the graph that names it. -> the file, or None (and no file) when the graphs share nothing."""
    import onnx
    from onnx.external_data_helper import set_external_data

    models = [onnx.load(str(p)) for p in paths]
    def key(tensor) -> tuple:
        return tensor.data_type, tuple(tensor.dims), hashlib.blake2b(tensor.raw_data, digest_size=16).digest()
    counts: dict[tuple, int] = {}
    for model in models:
        for tensor in model.graph.initializer:
            if tensor.raw_data:
                counts[key(tensor)] = counts.get(key(tensor), 0) + 1
    if not any(n > 1 for n in counts.values()):
        return None
    placed: dict[tuple, tuple[int, int]] = {}
    with data.open("wb") as f:
        for model in models:
            for tensor in model.graph.initializer:
                if not tensor.raw_data or counts[key(tensor)] < 2:
                    continue
                if key(tensor) not in placed:
                    f.write(b"\0" * (-f.tell() % alignment))
                    placed[key(tensor)] = (f.tell(), len(tensor.raw_data))
                    f.write(tensor.raw_data)
                offset, length = placed[key(tensor)]
                set_external_data(tensor, data.name, offset, length)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
    for model, path in zip(models, paths):
        onnx.save(model, str(path))
    return data


def weights_digest(module: nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_encoder_onnx(encoder: Encoder, spatial: bool) -> Path:
    """The encoder's ONNX file, exported once per set of weights (2 s) and reused by later processes."""
    key = f"{encoder.name}-{weights_digest(encoder)}-{encoder.transform.size}-{int(spatial)}-{int(encoder.with_labels)}"
    directory = ENGINE_CACHE.expanduser()
    path = directory / f"{key}-opset{OPSET}.onnx"
    if not path.exists():
        atomic_file(path, lambda tmp: export_encoder(encoder, tmp, spatial), suffix=".onnx.tmp")
    return path
