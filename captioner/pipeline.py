"""The public API: `Captioner` ties an encoder, a decoder, a vocabulary and the image transform
together. The UI, the CLI and the tests all go through it."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .data.images import MAX_IMAGE_PIXELS, ImageError, ImageInput, ImageTransform, describe
from .data.loading import image_batches
from .data.vocab import Vocabulary
from .grounding.evidence import GROUNDING, object_word_groups, required_objects, word_objects
from .grounding.labels import Label, imagenet_classes, top_labels
from .grounding.naming import name_animal, recognised_animals
from .inference import decoding
from .inference.consensus import consensus_order
from .inference.engines import build_engine, resolve_backend
from .model import hub
from .model.checkpoint import load_checkpoint, save_checkpoint
from .model.decoder import MAX_CONSENSUS_SAMPLES, CaptionDecoder, set_step
from .model.encoders import Encoder
from .model.runtime import autocast_dtype

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
BUILTIN = "flickr8k_coco"
METHODS = ("greedy", "sample", "beam")
# The options of `Captioner.decode` that each method reads; every method also reads `grounding` and
# the expert settings (None: the checkpoint's own).
METHOD_OPTIONS = {"greedy": ("max_length",),
                  "sample": ("temperature", "top_k", "top_p", "num_samples", "max_length"),
                  "beam": ("beam_size", "length_penalty", "no_repeat_ngram_size", "max_length")}
EXPERT_OPTIONS = ("evidence_weight", "evidence_threshold", "person_weight", "person_threshold", "object_weight",
                  "object_threshold", "include_threshold", "max_constraints", "include_cost", "consensus_samples")


@dataclass
class GeneratedCaption:
    text: str
    words: list[str]
    logprob: float
    token_logprobs: list[float]
    ended: bool
    score: float | None = None
    renamed: dict[int, str] = field(default_factory=dict)  # position in `words` -> the decoder's word there
    required: list[str] = field(default_factory=list)  # the objects the evidence required (grounding="full")

    @property
    def perplexity(self) -> float:
        """Per-token perplexity, <end> included."""
        return float(torch.tensor(-self.logprob / max(1, len(self.token_logprobs))).exp())


@dataclass
class ImageResult:
    """The captions of one input (several for sampling or beams), or why it failed."""

    source: str
    captions: list[GeneratedCaption] = field(default_factory=list)
    error: str | None = None
    labels: list[Label] | None = None  # what the encoder sees, when asked for (`labels=k`)

    @property
    def text(self) -> str | None:
        return self.captions[0].text if self.captions else None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Captioner:
    def __init__(self, encoder: Encoder, decoder: CaptionDecoder, vocab: Vocabulary, transform: ImageTransform,
                 config: dict | None = None, device: str | torch.device | None = None, precision: str = "auto",
                 backend: str = "auto", fold: bool = True):
        """`precision="auto"`: bf16/fp16 where the hardware is native (the encoder, and the decoder
        step's weights), fp32 elsewhere. `backend`: where `encode` runs (inference/engines.py). `fold=False`
        keeps inference on the modules exactly as trained: no folded encoder trunk (backend
        "torch") and nn.LSTM decoding steps."""
        self.device = torch.device(device) if device else default_device()
        self.precision = precision
        dtype = autocast_dtype(self.device, precision)  # rejects an unknown precision now
        self.backend, self.fold = resolve_backend(backend, self.device, precision), fold
        self.encoder = encoder.to(self.device).eval()
        self.decoder = decoder.to(self.device).eval()
        set_step(self.decoder, fold, dtype or torch.float32)
        self.vocab, self.transform = vocab, transform
        self.config = config or {}
        self._engine = None  # built at the first `encode`: an ONNX export and compile take seconds

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        precision: str = "auto", backend: str = "auto", fold: bool = True,
                        revision: str | None = None) -> "Captioner":
        """Loads a checkpoint directory, a Hugging Face Hub repository ("org/name", at `revision`;
        a local directory of that name wins), or with no argument the built-in model (offline)."""
        if path is None or str(path) == BUILTIN:
            directory = PRETRAINED_DIR / BUILTIN
        elif hub.is_repo_id(path):
            directory = hub.download(str(path), revision)
        else:
            directory = Path(path)
        device = torch.device(device) if device else default_device()
        encoder, decoder, vocab, transform, config = load_checkpoint(directory, device)
        return cls(encoder, decoder, vocab, transform, config, device, precision, backend, fold)

    def save_pretrained(self, directory: str | Path, training: dict | None = None,
                        dtype: torch.dtype = torch.float32) -> Path:
        return save_checkpoint(directory, encoder=self.encoder, decoder=self.decoder, vocab=self.vocab,
                               transform=self.transform, training=training or self.config.get("training"), dtype=dtype)

    def push_to_hub(self, repo_id: str, *, private: bool = False, revision: str | None = None,
                    token: str | None = None) -> str:
        """Saves this model and uploads it, with a model card, to the Hub repository `repo_id`."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return hub.push(self.save_pretrained(Path(tmp) / "checkpoint"), repo_id, private=private,
                            revision=revision, token=token)

    # -- the pipeline: pixels -> features -> captions ------------------------------------------

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W preprocessed pixels -> fp32 features (pooled, or maps for attention)."""
        if self._engine is None:
            self._engine = build_engine(self.encoder, self.decoder.config.takes_map, self.backend, self.device,
                                        self.precision, self.fold)
        return self._engine(pixels.to(self.device, non_blocking=True)).to(self.device)

    def encode_files(self, sources: Sequence[ImageInput], batch_size: int = 32) -> tuple[list[int], torch.Tensor]:
        """-> (the indices into `sources` of the images that could be read, their features in that
        order): an unreadable image is left out, as `captioner eval` leaves it out."""
        kept, parts = [], []
        for indices, pixels, _ in image_batches(list(sources), self.transform, batch_size, 0):
            if pixels is not None:
                kept += indices
                parts.append(self.encode(pixels[0]))
        return kept, torch.cat(parts) if parts else torch.zeros(0)

    def decode(self, features: torch.Tensor, method: str = "greedy", *, seeds: Sequence[int] | None = None,
               beam_size: int = 3, length_penalty: float = 0.0, no_repeat_ngram_size: int = 0,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_samples: int = 1,
               max_length: int = 20, grounding: str = "full", evidence_weight: float | None = None,
               evidence_threshold: float | None = None, person_weight: float | None = None,
               person_threshold: float | None = None, object_weight: float | None = None,
               object_threshold: float | None = None, include_threshold: float | None = None, max_constraints: int | None = None,
               include_cost: float | None = None, consensus_samples: int | None = None, name_animals: bool | None = None,
               name_once: bool | None = None) -> list[list[GeneratedCaption]]:
        """`grounding`: "off" decodes the words as the decoder ranks them; "avoid" lowers the words
        the image does not support, names an object once (the checkpoint's `named_once`) and names
        the animal the encoder's classifier is sure of; "full"
        also requires, in beam search, the objects the classifier surely sees (greedy and sampling
        read it as "avoid"). The expert settings (grounding/evidence.py; None: the checkpoint's own)
        tune them: `evidence_weight`/`evidence_threshold` the concept penalty, `person_weight`/
        `person_threshold` the person detector's, `object_weight`/`object_threshold` the object detectors',
        `include_threshold`/`max_constraints` what is required and `include_cost` the most it may cost
        a caption (nats), `name_animals` the renaming, `name_once` naming an object once;
        `consensus_samples` re-ranks beam search's beams by their agreement with that many of the
        decoder's own samples (inference/consensus.py; 0: off), the winner first."""
        if grounding not in GROUNDING:
            raise ValueError(f"grounding must be one of {', '.join(GROUNDING)}, not {grounding!r}")
        c = self.decoder.config
        evidence = {"evidence_weight": evidence_weight, "evidence_threshold": evidence_threshold,
                    "person_weight": person_weight, "person_threshold": person_threshold,
                    "object_weight": object_weight,
                    "object_threshold": object_threshold}
        if grounding == "off":
            evidence = dict(evidence, evidence_weight=0.0, person_weight=0.0, object_weight=0.0)
        if name_animals is None:
            name_animals = grounding != "off"
        probs = None
        if self.encoder.num_classes == len(imagenet_classes()[0]) and (name_animals or grounding == "full"):
            with torch.inference_mode():
                probs = self.encoder.label_probs(self._pooled(features)).float()
        required = [[] for _ in range(features.size(0))]
        if method == "beam" and grounding == "full" and probs is not None:
            required = required_objects(c, probs, c.include_threshold if include_threshold is None else include_threshold,
                                        c.max_constraints if max_constraints is None else max_constraints)
        if name_once is None:
            name_once = grounding != "off"
        named_once = object_word_groups(self.vocab, c.named_once) if name_once else None
        if named_once is not None:
            named_once = named_once.to(features.device)
        if method == "greedy":
            raw = decoding.greedy(self.decoder, features, max_length=max_length, evidence=evidence,
                                  named_once=named_once)
        elif method == "beam" and any(required):
            constraints = [[[[self.vocab.stoi[w] for w in phrase.split()] for phrase in c.label_objects[obj]["words"]]
                            for obj in objects] for objects in required]
            raw = decoding.constrained_beam_search(self.decoder, features, constraints, beam_size=beam_size,
                                                   length_penalty_alpha=length_penalty, max_length=max_length,
                                                   no_repeat_ngram_size=no_repeat_ngram_size, evidence=evidence,
                                                   named_once=named_once,
                                                   max_cost=c.include_cost if include_cost is None else include_cost)
        elif method == "beam":
            raw = decoding.beam_search(self.decoder, features, beam_size=beam_size, length_penalty_alpha=length_penalty,
                                       max_length=max_length, no_repeat_ngram_size=no_repeat_ngram_size,
                                       evidence=evidence, named_once=named_once)
        elif method == "sample":
            raw = decoding.sample(self.decoder, features, seeds=list(seeds), temperature=temperature, top_k=top_k,
                                  top_p=top_p, num_samples=num_samples, max_length=max_length, evidence=evidence,
                                  named_once=named_once)
        else:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        consensus_samples = c.consensus_samples if consensus_samples is None else consensus_samples
        if method == "beam" and consensus_samples:
            raw = self._by_consensus(raw, required, features, consensus_samples, max_length, evidence, named_once)
        animals = [None] * len(raw)
        if name_animals and probs is not None:
            probs = probs.cpu()
            animals = recognised_animals(probs)
        label_probs = probs if name_animals and probs is not None else [None] * len(raw)
        return [[self._to_text(c, p, a, r) for c in per_image]
                for per_image, p, a, r in zip(raw, label_probs, animals, required)]

    def _by_consensus(self, beams: list[list[decoding.Caption]], required: list[list[str]], features: torch.Tensor,
                      samples: int, max_length: int, evidence: dict,
                      named_once: torch.Tensor | None) -> list[list[decoding.Caption]]:
        """Each image's beams re-ranked by consensus with `samples` of its own (every image draws them
        with seed 0, so a caption depends on neither its batch nor its place in it). The objects a
        beam names: the words of word_objects, and the `required` objects it writes."""
        if not 0 <= samples <= MAX_CONSENSUS_SAMPLES:
            raise ValueError(f"consensus_samples must be 0 (off) to {MAX_CONSENSUS_SAMPLES}, not {samples}")
        drawn = decoding.sample(self.decoder, features, seeds=[0] * features.size(0), num_samples=samples,
                                max_length=max_length, evidence=evidence, named_once=named_once)
        config = self.decoder.config
        objects = word_objects(self.vocab, config.named_once, self.decoder.person_words)
        ranked = []
        for per_image, own, image_required in zip(beams, drawn, required):
            def named(tokens, image_required=image_required):
                words = self.vocab.words(tokens)
                return ({objects[t] for t in tokens if t in objects}
                        | {obj for obj in image_required if _writes(words, config.label_objects[obj]["words"])})

            order = consensus_order([b.tokens for b in per_image], [s.tokens for s in own], named)
            ranked.append([per_image[i] for i in order])
        return ranked

    def _to_text(self, caption: decoding.Caption, label_probs: torch.Tensor | None,
                 animal: tuple[str, float] | None, required: list[str]) -> GeneratedCaption:
        words, renamed = self.vocab.words(caption.tokens), {}
        if label_probs is not None:
            words, renamed = name_animal(words, label_probs, animal)
        words, text = self.vocab.sentence(words)
        met = [obj for obj in required if _writes(words, self.decoder.config.label_objects[obj]["words"])]
        return GeneratedCaption(text, words, caption.logprob, caption.token_logprobs, caption.ended,
                                caption.score, renamed, met)

    @staticmethod
    def _base_seed(seed: int | None) -> int:
        return random.SystemRandom().randrange(2**31) if seed is None else seed

    def _pooled(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features for the classifier: `features` themselves unless the decoder reads maps."""
        return features.mean(dim=(2, 3)) if self.decoder.config.takes_map else features

    def explain(self, image: ImageInput, caption: str | None = None, method: str = "greedy", **options):
        """Per-word heat maps, word probabilities and alternatives, and the encoder's labels for one
        image's caption, or for a given `caption` (inference/explain.py)."""
        from .inference.explain import explain

        return explain(self, image, caption, method, **options)

    def labels(self, images: ImageInput | Sequence[ImageInput], k: int = 5, batch_size: int = 32):
        """What the encoder sees: the `k` most probable ImageNet classes of each image, each with
        its everyday word and probability, most probable first. One input -> a list of `Label`s;
        a list of inputs -> a list of those. A bad input raises its `ImageError`."""
        results = self.generate(images, method=None, labels=k, batch_size=batch_size)
        for r in results:
            if r.error:
                raise ImageError(r.error)
        return results[0].labels if _is_single(images) else [r.labels for r in results]

    def generate(self, images: ImageInput | Sequence[ImageInput], method: str | None = "greedy", *,
                 seed: int | None = None, batch_size: int = 32, labels: int = 0, **options) -> list[ImageResult]:
        """Captions in-memory inputs (paths, bytes, PIL images, arrays); a bad input gets its error,
        the rest still caption. Sampling: image i of the call uses seed `seed + i`. `labels=k`
        also gives each result its top-k ImageNet labels; `method=None` gives labels only."""
        items = [images] if _is_single(images) else list(images)
        results = [ImageResult(describe(x)) for x in items]
        base_seed = self._base_seed(seed) if method == "sample" else 0
        for start in range(0, len(items), batch_size):
            chunk = list(range(start, min(start + batch_size, len(items))))
            pixels, good = [], []
            for i in chunk:
                try:
                    pixels.append(self.transform.load(items[i]))
                    good.append(i)
                except ImageError as err:
                    results[i].error = str(err)
            if good:
                self._caption_batch(self.encode(torch.stack(pixels)), good, results, method,
                                    [base_seed + i for i in good], options, labels)
        return results

    def caption_pixels(self, pixels: torch.Tensor, sources: Sequence[str], method: str | None = "greedy", *,
                       seeds: Sequence[int] | None = None, labels: int = 0, **options) -> list[ImageResult]:
        """Captions images already preprocessed (B x 3 x H x W, as `transform.load` gives them) in one
        model call, image i with seed `seeds[i]` when sampling: what a server batching the images of
        several requests runs. `sources` name the results."""
        results = [ImageResult(source) for source in sources]
        seeds = list(seeds) if seeds is not None else [0] * len(results)
        self._caption_batch(self.encode(pixels), list(range(len(results))), results, method, seeds, options, labels)
        return results

    def _caption_batch(self, features, indices, results, method, seeds, options, labels: int = 0) -> None:
        if labels:
            with torch.inference_mode():
                probs = self.encoder.label_probs(self._pooled(features))
            for i, image_labels in zip(indices, top_labels(probs, labels)):
                results[i].labels = image_labels
        if method is None:
            return
        per_image = self.decode(features, method, seeds=seeds, **options)
        for i, captions in zip(indices, per_image):
            results[i].captions = captions

    def caption(self, images: ImageInput | Sequence[ImageInput], method: str = "greedy", **options):
        """Text only. One input -> a string (a list of strings with num_samples > 1); a list of
        inputs -> a list of those. A bad input raises its `ImageError`."""
        single = _is_single(images)
        results = self.generate(images, method, **options)
        out = []
        for r in results:
            if r.error:
                raise ImageError(r.error)
            many = method == "sample" and options.get("num_samples", 1) > 1
            out.append([c.text for c in r.captions] if many else r.text)
        return out[0] if single else out

    def caption_paths(self, paths: Iterable[str | Path | bytes], method: str = "greedy", *, batch_size: int = 32,
                      decode_batch_size: int = 256, workers: int | None = None, seed: int | None = None,
                      max_pixels: int = MAX_IMAGE_PIXELS, labels: int = 0, names: Sequence[str] | None = None,
                      **options) -> Iterator[ImageResult]:
        """Captions files in order, decoding them in `workers` DataLoader processes (None: none on
        2 cores or fewer, else one) while this one runs the model. Yields one `ImageResult` per
        path, errors included, group by group.
        Images are encoded `batch_size` at a time and their features decoded at least
        `decode_batch_size` at a time: every decoding step streams all of the decoder's weights, so
        a step for 256 images costs little more than one for 32 (bench/README.md).
        Sampling seeds each file with `seed + CRC32(path)`: the same file samples the same captions
        whatever the batch size, the order, or a resumed run. `labels=k`: as for `generate`.
        `names`: how results name the inputs (and seed them), for inputs given as encoded bytes."""
        sources = list(paths)
        paths = list(names) if names is not None else [str(p) for p in sources]
        base_seed = self._base_seed(seed) if method == "sample" else 0
        batches = image_batches(sources, self.transform, batch_size, workers, pin_memory=self.device.type == "cuda",
                                max_pixels=max_pixels)
        results: dict[int, ImageResult] = {}
        features, good = [], []
        offset = 0
        for batch_good, pixels, errors in batches:
            count = len(batch_good) + len(errors)
            results.update((i, ImageResult(paths[i])) for i in range(offset, offset + count))
            for i, message in errors.items():
                # an error names its input as `describe` does; a named input goes by its name
                results[i].error = message if names is None else message.replace(describe(sources[i]), paths[i], 1)
            if batch_good:
                features.append(self.encode(pixels[0]))
                good += batch_good
            offset += count
            if len(good) >= decode_batch_size or offset == len(paths):
                if good:
                    seeds = [(base_seed + zlib.crc32(paths[i].encode())) % 2**63 for i in good]
                    self._caption_batch(torch.cat(features), good, results, method, seeds, options, labels)
                yield from (results[i] for i in sorted(results))
                results, features, good = {}, [], []


def _writes(words: Sequence[str], phrases: Iterable[str]) -> bool:
    """Whether a caption's words write any of `phrases` (one or two words each)."""
    text = f" {' '.join(words)} "
    return any(f" {phrase} " in text for phrase in phrases)


def _is_single(images) -> bool:
    return not isinstance(images, (list, tuple))
