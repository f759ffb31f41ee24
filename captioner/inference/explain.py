"""Why a caption says what it says: for each word, a map of the photo regions that drove it, the
word's probability and the words the model weighed instead, beside what the encoder sees.

The maps are Grad-CAM (Selvaraju et al., ICCV 2017, shown there on captioning): the gradient of the
word's log-probability, given the words before it, with respect to the encoder's last feature map,
averaged over each channel's positions, weights that channel; the weighted sum, ReLU'd, is the map.
The CNN runs once, without gradients; one backward pass through the decoder gives every word's
map, each word reading its own copy of the feature map. A decoder with attention can show its
attention weights of each word's step instead (`maps="attention"`, its default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import ImageInput, load_image
from ..data.vocab import END, SPECIALS, START, UNK, tokenize
from ..grounding.labels import Label, top_labels
from ..model.ensemble import DecoderEnsemble
from ..model.runtime import autocast

MAP_KINDS = ("auto", "grad-cam", "attention")


@dataclass
class ExplainedWord:
    word: str
    probability: float  # the decoder's own, given the words before (before any evidence penalty)
    alternatives: list[tuple[str, float]]  # the most probable other words at that position
    heatmap: np.ndarray = field(repr=False)  # H x W over the photo, 0..1
    decoder_word: str | None = None  # what the decoder wrote where the classifier named the animal (grounding/naming.py)


@dataclass
class Explanation:
    caption: str
    words: list[ExplainedWord]
    labels: list[Label]
    maps: str  # "grad-cam" or "attention"

    def to_dict(self) -> dict:
        """Everything but the maps, for JSON."""
        return {"caption": self.caption, "maps": self.maps,
                "words": [{"word": w.word, "probability": round(w.probability, 4),
                           "alternatives": [[a, round(p, 4)] for a, p in w.alternatives],
                           **({"decoder_word": w.decoder_word} if w.decoder_word else {})} for w in self.words],
                "labels": [{"name": x.name, "word": x.word, "probability": x.probability} for x in self.labels]}


def explain(captioner, image: ImageInput, caption: str | None = None, method: str = "greedy", *,
            maps: str = "auto", alternatives: int = 3, labels: int = 5, **options) -> Explanation:
    """Explains the caption `method` writes for `image` (the top beam, or the first sample), or with
    `caption=` a given one, teacher-forced: how a user asks "why not 'dog'?". Words outside the
    vocabulary are explained as <unk>."""
    if maps not in MAP_KINDS:
        raise ValueError(f"maps must be one of {', '.join(MAP_KINDS)}, not {maps!r}")
    decoder, encoder = captioner.decoder, captioner.encoder
    if isinstance(decoder, DecoderEnsemble):
        raise ValueError("explain needs a single decoder; export the ensemble with --members 1")
    takes_map = decoder.config.takes_map
    if maps == "auto":
        maps = "attention" if takes_map else "grad-cam"
    if maps == "attention" and not takes_map:
        raise ValueError("this decoder has no attention (attention_dim = 0); use maps='grad-cam'")
    photo = load_image(image)
    pixels = captioner.transform(photo)[None].to(captioner.device)
    with torch.inference_mode(), autocast(captioner.device, captioner.precision):
        fmap = encoder(pixels, spatial=True).float()
    fmap = fmap.clone()  # out of inference mode, so that gradients can reach it
    features = fmap if takes_map else encoder.pool(fmap)

    renamed = {}
    if caption is None:
        [[best, *_]] = captioner.decode(features, method, seeds=[0], **options)
        words, renamed = best.words, best.renamed
    else:
        words = tokenize(caption)
    if not words:
        raise ValueError("nothing to explain: the caption has no words")
    # an animal the classifier named is explained as the word the decoder wrote there
    ids = [captioner.vocab.stoi.get(renamed.get(i, w), UNK) for i, w in enumerate(words)]
    tokens = torch.tensor([[START, *ids, END]], device=captioner.device)
    n = len(ids)

    # Every word reads its own copy of the map: one backward pass gives each word its own gradient.
    copies = fmap.detach().repeat(n, 1, 1, 1).requires_grad_(maps == "grad-cam")
    inputs = copies if takes_map else encoder.pool(copies)
    lengths = torch.full((n,), n + 2)
    with torch.enable_grad():
        log_probs = F.log_softmax(decoder(inputs, tokens.expand(n, -1), lengths).float(), dim=-1)
        positions = torch.arange(n, device=captioner.device)
        chosen = log_probs[positions, positions, tokens[0, 1:n + 1]]
        if maps == "grad-cam":
            (grads,) = torch.autograd.grad(chosen.sum(), copies)
            cams = F.relu((grads.mean(dim=(2, 3), keepdim=True) * copies).sum(1)).detach()
        else:
            weights = decoder.attention_weights(inputs, tokens.expand(n, -1), lengths)
            cams = weights[positions, positions].view(n, *fmap.shape[2:]).detach()
    heatmaps = photo_maps(cams, captioner.transform.crop_box(*photo.size), photo.size)

    probs = log_probs[0].exp().detach()
    probs[:, :len(SPECIALS)] = 0  # the alternatives are words
    explained = []
    for i, (word, heatmap) in enumerate(zip(words, heatmaps)):
        others = probs[i].clone()
        others[ids[i]] = 0
        top = others.topk(alternatives)
        explained.append(ExplainedWord(word, float(chosen[i].detach().exp()),
                                       [(captioner.vocab.itos[j], round(float(p), 4))
                                        for p, j in zip(top.values.tolist(), top.indices.tolist())], heatmap,
                                       renamed.get(i)))
    seen = []
    if labels and encoder.classifier is not None:
        with torch.inference_mode():
            [seen] = top_labels(encoder.label_probs(encoder.pool(fmap)), labels)
    return Explanation(captioner.vocab.sentence(words)[1], explained, seen, maps)


def photo_maps(cams: torch.Tensor, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """N x h x w maps over the model's input -> N x H x W over the photo (0 outside what the model
    saw), each scaled to 0..1 by its maximum (a map of zeros stays zeros)."""
    width, height = size
    left, top, right, bottom = (round(v) for v in box)
    inside = F.interpolate(cams[:, None].float(), size=(max(1, bottom - top), max(1, right - left)),
                           mode="bilinear", align_corners=False)[:, 0]
    peak = inside.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    out = torch.zeros(len(cams), height, width)
    out[:, top:bottom, left:right] = (inside / peak).clamp(0, 1)[:, :height - top, :width - left].cpu()
    return out.numpy()


def overlay(photo: Image.Image, heatmap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The photo with a word's map drawn over it (red where the word looked)."""
    from matplotlib import colormaps

    colours = (colormaps["jet"](heatmap)[..., :3] * 255).astype(np.uint8)
    return Image.blend(photo.convert("RGB"), Image.fromarray(colours).resize(photo.size), alpha)
