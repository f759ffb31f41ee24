"""COCO-caption metrics (pycocoevalcap) plus the caption-quality numbers reported beside them:
a higher CIDEr bought with a narrower vocabulary or cut-off captions is not an improvement."""

from __future__ import annotations

import shutil
from collections import Counter
from typing import Mapping, Sequence

from ..data.vocab import tokenize

# A caption that ends on one of these was cut mid-phrase: "a dog runs into the", "a man in a red".
DANGLING = {"a", "an", "the", "of", "with", "in", "on", "and", "at", "to", "for", "into", "his", "her", "their",
            "its", "is", "are", "while", "through", "from", "by", "as", "near", "under", "over", "behind", "two",
            "three", "several", "some", "other", "another", "wearing", "holding",
            # adjectives that caption datasets use before a noun, never to end a sentence
            "red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "purple", "gray", "grey",
            "large", "small", "big", "little", "young", "old", "tall", "wooden", "striped", "colorful", "dark"}


def java_available() -> bool:
    return shutil.which("java") is not None


def _tokenized(captions: Mapping[str, Sequence[str]], use_ptb: bool) -> dict[str, list[str]]:
    if use_ptb:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions.items()}


def score_captions(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   metrics: Sequence[str] = ("bleu", "meteor", "rouge", "cider"), quiet: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (x100) over the images in `predictions`.

    Both sides go through the PTB tokenizer (Java), as the COCO evaluation does. Without Java, a
    Python tokenisation stands in, METEOR is skipped, and `tokenizer` in the result says so.
    """
    missing = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"{len(missing)} predicted image(s) have no references, e.g. {missing[0]}")
    use_ptb = java_available()
    refs = _tokenized({k: references[k] for k in predictions}, use_ptb)
    preds = _tokenized({k: [v] for k, v in predictions.items()}, use_ptb)
    scores: dict = {"tokenizer": "ptb" if use_ptb else "python (java not found: METEOR skipped)", "images": len(preds)}
    if "bleu" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(refs, preds, verbose=0)
        scores.update({f"BLEU-{i + 1}": 100 * b for i, b in enumerate(bleu)})
    if "meteor" in metrics and use_ptb:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = 100 * Meteor().compute_score(refs, preds)[0]
    if "rouge" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        scores["ROUGE-L"] = 100 * Rouge().compute_score(refs, preds)[0]
    if "cider" in metrics:
        from pycocoevalcap.cider.cider import Cider

        scores["CIDEr"] = 100 * Cider().compute_score(refs, preds)[0]
    return scores


def cut_mid_phrase(words: Sequence[str]) -> bool:
    """Whether a caption's words end on one that wants another after it ("a man in a red"); "each
    other" ends a sentence, though "other" alone does not ("next to the other")."""
    return bool(words) and words[-1] in DANGLING and words[-2:] != ["each", "other"]


def caption_stats(captions: Sequence[str], ended: Sequence[bool] | None = None) -> dict:
    """Vocabulary use and truncation: distinct words, distinct captions, captions cut mid-phrase."""
    words = [tokenize(c) for c in captions]
    counts = Counter(w for ws in words for w in ws)
    dangling = sum(map(cut_mid_phrase, words))
    unended = sum(1 for e in ended if not e) if ended is not None else 0
    return {
        "captions": len(captions),
        "distinct_words": len(counts),
        "distinct_captions": len(set(" ".join(ws) for ws in words)),
        "mean_length": sum(map(len, words)) / max(1, len(words)),
        "cut_mid_phrase": dangling,
        "hit_max_length": unended,
    }
