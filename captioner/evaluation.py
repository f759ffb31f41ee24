"""`captioner eval`: caption a dataset split end to end (JPEG -> caption) and score it."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_file
from .datasets import CaptionDataset, load_dataset
from .hallucination import ObjectTable, hallucination
from .metrics import caption_stats, score_captions
from .model import Captioner


def evaluate(captioner: Captioner, dataset: str | Path | CaptionDataset, split: str = "test", *,
             images: str | None = None, format: str | None = None, method: str = "beam",
             out_dir: str | Path | None = None, batch_size: int = 50, workers: int | None = None, limit: int = 0,
             objects: str | Path | None = None, **options) -> dict:
    """-> scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr) and caption stats, and with `objects` (the
    CHAIR table) object hallucination and recall; with `out_dir`, writes predictions.jsonl and
    scores.json there. `dataset`: a path as `load_dataset` reads it, or a dataset already read."""
    table = ObjectTable.load(objects) if objects else None  # a bad table fails before captioning
    data = dataset if isinstance(dataset, CaptionDataset) else load_dataset(dataset, images, format)
    records = data.split(split)
    if not records:
        raise ValueError(f"{data.source}: split {split!r} is empty")
    if limit:
        records = records[:limit]
    predictions, ended, rows = {}, [], []
    for record, result in zip(records, captioner.caption_paths([r.image for r in records], method,
                                                               batch_size=batch_size, workers=workers, seed=0,
                                                               **options)):
        if result.error:
            rows.append({"image": str(record.image), "error": result.error})
            continue
        best = result.captions[0]
        predictions[str(record.image)] = best.text
        ended.append(best.ended)
        rows.append({"image": str(record.image), "caption": best.text, "logprob": round(best.logprob, 4)})
    references = {str(r.image): r.captions for r in records}
    scores = score_captions(predictions, references)
    stats = caption_stats(list(predictions.values()), ended)
    name = data.source if isinstance(dataset, CaptionDataset) else dataset
    report = {"dataset": str(name), "split": split, "method": method, "options": options, "scores": scores,
              "stats": stats, "failed_images": len(records) - len(predictions)}
    if table is not None:
        report["hallucination"] = hallucination(predictions, references, table)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        text = json.dumps(report, indent=2) + "\n"
        atomic_file(out / "scores.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return report


def format_report(report: dict) -> str:
    s = report["scores"]
    names = [k for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in s]
    st = report["stats"]
    return "\n".join([
        f"{report['split']} split, {s['images']} images, {report['method']} {report['options']} "
        f"(tokenizer: {s['tokenizer']})",
        "  ".join(f"{n} {s[n]:.2f}" for n in names),
        f"distinct words {st['distinct_words']}, distinct captions {st['distinct_captions']}/{st['captions']}, "
        f"mean length {st['mean_length']:.1f}, cut mid-phrase {st['cut_mid_phrase']}, "
        f"hit max length {st['hit_max_length']}",
    ] + ([_format_hallucination(report["hallucination"])] if "hallucination" in report else []))


def _format_hallucination(h: dict) -> str:
    invented = ", ".join(f"{obj} {n}" for obj, n in h["most_invented"])
    return (f"CHAIRs {h['CHAIRs']:.1f}%  CHAIRi {h['CHAIRi']:.1f}%  object recall {h['object_recall']:.1f}%  "
            f"({h['object_mentions']} object mentions; most invented: {invented or 'none'})")
