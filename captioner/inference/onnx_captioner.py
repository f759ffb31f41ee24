"""Captioning from an ONNX export (`captioner export CHECKPOINT DIR --onnx`) with ONNX Runtime and
numpy only: what a deployment without PyTorch's model code runs. Greedy decoding, step for step as
`Captioner.decode` does it (decoding.py): the same banned tokens, no empty caption, each object
named once as grounding/evidence.py's repeat_mask says (here in numpy), the same sentence guard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.images import ImageInput, ImageTransform
from ..data.vocab import END, NEVER_GENERATED, START, Vocabulary

FILES = {"encoder": "encoder.onnx", "start": "decoder_start.onnx", "step": "decoder_step.onnx"}
# the weights decoder_start.onnx and decoder_step.onnx both hold (the LSTM's, where the start runs it
# over the image evidence), stored once as ONNX external data that both graphs point into
SHARED_WEIGHTS = "decoder_shared.weights"


class OnnxCaptioner:
    def __init__(self, directory: str | Path, threads: int | None = None):
        directory = Path(directory)
        missing = [name for name in (*FILES.values(), "config.json", "vocab.json") if not (directory / name).exists()]
        if missing:
            raise FileNotFoundError(f"{directory}: not an ONNX export (missing {', '.join(missing)}); "
                                    f"write one with `captioner export CHECKPOINT {directory} --onnx`")
        import onnxruntime

        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        self.transform = ImageTransform.from_dict(config["transform"])
        self.vocab = Vocabulary.load(directory / "vocab.json")
        self.object_words = [[self.vocab.stoi[w] for w in words if w in self.vocab.stoi]
                             for words in config["decoder"].get("named_once", [])]
        self.object_of = {w: index for index, ids in enumerate(self.object_words) for w in ids}
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {part: onnxruntime.InferenceSession(str(directory / name), options,
                                                            providers=["CPUExecutionProvider"])
                         for part, name in FILES.items()}

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """B x 3 x H x W float32 pixels (the checkpoint's preprocessing) -> B x D features."""
        return self.sessions["encoder"].run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})[0]

    def greedy(self, features: np.ndarray, max_length: int = 20) -> list[list[int]]:
        """Features -> each image's word ids, <end> excluded."""
        h, c, bias = self.sessions["start"].run(None, {"features": features})
        rows = np.arange(len(features))
        tokens = np.full(len(features), START, dtype=np.int64)
        words: list[list[int]] = [[] for _ in rows]
        named: list[set[int]] = [set() for _ in rows]  # the objects each caption named before its last word
        for t in range(max_length):
            logits, h, c = self.sessions["step"].run(None, {"tokens": tokens, "h_in": h, "c_in": c, "bias": bias})
            logits[:, list(NEVER_GENERATED)] = -np.inf
            if t == 0:
                logits[:, END] = -np.inf
            elif self.object_of:
                for i, row in enumerate(rows):
                    logits[i, [words[row][-1], *(w for obj in named[row] for w in self.object_words[obj])]] = -np.inf
            tokens = logits.argmax(1)
            running = tokens != END
            for row, token in zip(rows[running], tokens[running]):
                if words[row] and words[row][-1] in self.object_of:
                    named[row].add(self.object_of[words[row][-1]])
                words[row].append(int(token))
            if not running.any():
                break
            rows, tokens, h, c, bias = rows[running], tokens[running], h[:, running], c[:, running], bias[running]
        return words

    def caption(self, images: Sequence[ImageInput], max_length: int = 20) -> list[str]:
        pixels = np.stack([self.transform.load_array(image) for image in images])
        return [self.vocab.sentence(self.vocab.words(ids))[1] for ids in self.greedy(self.encode(pixels), max_length)]
