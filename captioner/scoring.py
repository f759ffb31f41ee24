"""Scoring a captioner end to end (JPEG -> caption -> metrics): `captioner eval` on a dataset split,
and the test report `captioner train` and `captioner export --score` write into a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data.atomic import atomic_file
from .data.datasets import CaptionDataset, dataset_name, load_dataset, load_datasets
from .evaluation.hallucination import ObjectTable, by_person, hallucination
from .evaluation.metrics import caption_stats, score_captions
from .pipeline import Captioner
from .training.distributed import log
from .training.recipe import TrainConfig


def evaluate(captioner: Captioner, dataset: str | Path | CaptionDataset, split: str = "test", *,
             images: str | None = None, format: str | None = None, method: str = "beam",
             out_dir: str | Path | None = None, batch_size: int = 50, workers: int | None = None, limit: int = 0,
             objects: str | Path | None = None, **options) -> dict:
    """-> scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr) and caption stats, and with `objects` (the
    CHAIR table) object hallucination and recall, also for photos with and without a person apart
    (`by_person`); with `out_dir`, writes predictions.jsonl and
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
        report["by_person"] = by_person(predictions, references, table)
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
    ] + ([_format_hallucination(report["hallucination"])] if "hallucination" in report else [])
      + [f"{PERSON_GROUPS[group]} ({h['photos']}): " + _format_hallucination(h)
         + (f"; a person invented in {h['person_invented']} ({100 * h['person_invented'] / h['photos']:.1f}%)"
            if "person_invented" in h else "")
         for group, h in report.get("by_person", {}).items()])


PERSON_GROUPS = {"with_person": "photos with a person", "without_person": "photos without a person"}


def _format_hallucination(h: dict) -> str:
    invented = ", ".join(f"{obj} {n}" for obj, n in h["most_invented"])
    return (f"CHAIRs {h['CHAIRs']:.1f}%  CHAIRi {h['CHAIRi']:.1f}%  object recall {h['object_recall']:.1f}%  "
            f"({h['object_mentions']} object mentions; most invented: {invented or 'none'})")


def report_test(config: TrainConfig, best_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> dict:
    """Scores the best checkpoint on each dataset's test split, once, at the end, and records it in
    its config (`test`, or `test` per dataset name for several)."""
    specs = config.dataset_specs()
    dataset = load_datasets(specs, shard_index=config.shard_index)  # as training read it, `split` included
    if not dataset.split("test"):
        return {}
    captioner = Captioner.from_pretrained(best_dir, precision=config.precision)
    paths = {}
    for spec in specs:  # entries joined under one name report under the first one's path
        paths.setdefault(dataset_name(spec), spec["path"])
    parts = dataset.parts()
    kept = ("split", "method", "options", "scores", "stats", "hallucination")
    reports = {}
    for name in parts:
        test = [r for r in dataset.split("test") if r.dataset == name]
        if not test:
            log(f"{name}: no test split to score")
            continue
        part = CaptionDataset(Path(paths[name]), dataset.sources[name][1], test)
        report = evaluate(captioner, part, "test", method="beam",
                          out_dir=out_dir / name if len(parts) > 1 else out_dir, workers=config.workers,
                          objects=config.objects or None, beam_size=config.eval_beam_size,
                          length_penalty=config.length_penalty, max_length=config.max_length)
        log((f"{name}: " if len(parts) > 1 else "") + format_report(report))
        reports[name] = {k: report[k] for k in kept if k in report}
    training = dict(captioner.config.get("training", {}))
    if not reports:
        return reports
    training["test"] = next(iter(reports.values())) if len(parts) == 1 else reports
    captioner.save_pretrained(best_dir, training=training, dtype=dtype)
    return reports
