"""Batch captioning of files and WebDataset shards: finding them, writing results as they come
(JSONL, CSV or shards), resuming after a kill.

`captioner caption` is a thin shell over `caption_files` and `caption_shards`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable

from tqdm.auto import tqdm

from .data.shards import Sample, ShardProblem, ShardWriter, read_samples
from .pipeline import Captioner, ImageResult

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def collect_paths(inputs: Iterable[str], recursive: bool = False, glob: str | None = None,
                  from_list: str | None = None) -> list[str]:
    """Files as given, image files inside folders (matching `glob` when set), and paths listed one a
    line in `from_list` ("-" for stdin); in order, without duplicates."""
    found: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = glob or "*"
            matches = path.rglob(pattern) if recursive else path.glob(pattern)
            files = sorted(p for p in matches if p.is_file() and (glob or p.suffix.lower() in IMAGE_SUFFIXES))
            found += [str(p) for p in files]
        else:
            found.append(item)  # a missing file is reported as that file's error, not a usage error
    if from_list:
        text = sys.stdin.read() if from_list == "-" else Path(from_list).read_text(encoding="utf-8")
        found += [line.strip() for line in text.splitlines() if line.strip()]
    return list(dict.fromkeys(found))


def shard(paths: list[str], spec: str) -> list[str]:
    """Part I of N of `paths` for `spec` "I/N" (0 <= I < N): N contiguous, disjoint parts whose union
    is every path exactly once, for schedulers that start N copies of one command (Slurm arrays,
    Kubernetes indexed jobs). Every copy must list the same inputs in the same order."""
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {spec!r}: I must be in 0..N-1")
    return paths[index * len(paths) // count:(index + 1) * len(paths) // count]


@dataclass
class ResultWriter:
    """Writes one record per image as JSONL or CSV, flushed as it goes, so a kill loses at most the
    records not yet written. `done` holds the images an earlier run already wrote (`resume`)."""

    target: str  # a file path, or "-" for stdout
    settings: dict
    format: str = "jsonl"  # jsonl | csv | tsv ("path<TAB>caption" lines, stdout only)
    done: set[str] = field(default_factory=set)
    stream: IO[str] | None = None
    csv_writer: object = None

    CSV_FIELDS = ("image", "caption", "logprob", "method", "settings")

    @classmethod
    def open(cls, target: str, settings: dict, resume: bool = False, format: str | None = None) -> "ResultWriter":
        fmt = format or ("csv" if target.lower().endswith(".csv") else "jsonl")
        writer = cls(target, settings, fmt)
        if target == "-":
            writer.stream = sys.stdout
        else:
            path = Path(target)
            if resume and path.is_file():
                writer.done = _repair_and_read(path, fmt)
            elif path.exists() and not resume:
                path.unlink()
            path.parent.mkdir(parents=True, exist_ok=True)
            writer.stream = path.open("a", encoding="utf-8", newline="")
        if fmt == "csv":
            writer.csv_writer = csv.writer(writer.stream)
            if writer.target == "-" or writer.stream.tell() == 0:
                writer.csv_writer.writerow(cls.CSV_FIELDS)
        return writer

    def write(self, result: ImageResult, sample: Sample | None = None) -> None:
        best = result.captions[0]
        if self.format == "tsv":
            self.stream.writelines(f"{result.source}\t{c.text}\n" for c in result.captions)
        elif self.format == "csv":
            self.csv_writer.writerow([result.source, best.text, round(best.logprob, 4), self.settings["method"],
                                      json.dumps(self.settings["options"], sort_keys=True)])
        else:
            record = {"image": result.source, "caption": best.text, "logprob": round(best.logprob, 4),
                      "method": self.settings["method"], **self.settings["options"]}
            if len(result.captions) > 1:
                record["captions"] = [{"caption": c.text, "logprob": round(c.logprob, 4)} for c in result.captions]
            if best.renamed:  # the animal the classifier named -> the decoder's word for it
                record["renamed"] = {best.words[i]: word for i, word in best.renamed.items()}
            if best.required:  # the objects the evidence brought in
                record["brought_in"] = best.required
            if result.labels:
                record["labels"] = [dataclasses.asdict(label) for label in result.labels]
            if sample is not None:
                record.update(shard=sample.shard, key=sample.key)
            self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self.stream.flush()
        if self.target != "-":
            os.fsync(self.stream.fileno())

    def close(self) -> None:
        if self.target != "-":
            self.stream.close()
        else:
            self.stream.flush()


def _repair_and_read(path: Path, fmt: str) -> set[str]:
    """Images already in an output file. A last line torn by a kill (no newline, or unparsable) is
    cut off, so the rerun writes it again whole."""
    data = path.read_bytes()
    keep = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
    done: set[str] = set()
    text = keep.decode("utf-8", errors="replace")
    if fmt == "jsonl":
        good_end = 0
        for line in text.splitlines(keepends=True):
            try:
                done.add(json.loads(line)["image"])
            except (ValueError, KeyError, TypeError):
                break
            good_end += len(line.encode("utf-8"))
        keep = keep[:good_end]
    else:
        rows = list(csv.reader(io.StringIO(text)))
        done = {row[0] for row in rows[1:] if len(row) == len(ResultWriter.CSV_FIELDS)}
    if len(keep) != len(data):
        with path.open("r+b") as f:
            f.truncate(len(keep))
    return done


class ShardResultWriter:
    """Results as WebDataset shards: each sample's members copied, with its caption as KEY.txt and
    the caption's record as KEY.json (file inputs: the file's bytes as KEY.<ext>)."""

    def __init__(self, pattern: str, settings: dict, per_shard: int = 10_000):
        self.shards, self.settings, self.done = ShardWriter(pattern, per_shard), settings, set()

    def write(self, result: ImageResult, sample: Sample | None = None) -> None:
        if sample is None:  # a file: its path, less the suffix, is the key
            path = Path(result.source)
            sample = Sample("", path.with_suffix("").as_posix().lstrip("/").replace("/", "_"),
                            {path.suffix.lstrip(".").lower() or "jpg": path.read_bytes()})
        best = result.captions[0]
        record = {"caption": best.text, "logprob": round(best.logprob, 4), "method": self.settings["method"],
                  **self.settings["options"]}
        if sample.caption is not None:
            record["original_caption"] = sample.caption
        files = {ext: data for ext, data in sample.files.items() if ext not in ("txt", "json")}
        self.shards.write(sample.key, {**files, "txt": best.text.encode(), "json": json.dumps(record).encode()})

    def flush(self) -> None:
        pass  # a shard becomes visible whole, when it is complete

    def close(self) -> None:
        self.shards.close()


def open_writer(target: str, settings: dict, resume: bool = False, format: str | None = None):
    """A ResultWriter, or a ShardResultWriter for a shard pattern such as 'out/{00000..}.tar'."""
    if target.endswith(".tar"):
        if resume:
            raise ValueError("--resume reads JSONL or CSV output; shard output is written anew")
        return ShardResultWriter(target, settings)
    return ResultWriter.open(target, settings, resume=resume, format=format)


def _report(name: str, message: str, errors_to: IO[str] | None) -> None:
    print(f"error: {message}", file=sys.stderr)
    if errors_to is not None:
        errors_to.write(json.dumps({"image": name, "error": message}) + "\n")
        errors_to.flush()


def caption_shards(captioner: Captioner, shards: list[str], writer, *, method: str = "greedy",
                   batch_size: int = 32, group: int = 256, seed: int | None = None,
                   errors_to: IO[str] | None = None, progress: bool = True, **options) -> tuple[int, int]:
    """Captions the samples of WebDataset `shards` as they stream in, `group` at a time, skipping
    those already in `writer.done`; a bad shard or sample is reported with shard and key and
    skipped. -> (captioned, failed)."""
    captioned = failed = 0
    bar = tqdm(unit="img", desc="captioning", disable=not progress, file=sys.stderr)
    pending: list[Sample] = []

    def run() -> None:
        nonlocal captioned, failed
        results = captioner.caption_paths([s.image for s in pending], method, batch_size=batch_size, workers=0,
                                          seed=seed, names=[s.name for s in pending], **options)
        for sample, result in zip(pending, results):
            if result.error:
                failed += 1
                _report(sample.name, result.error, errors_to)
            else:
                captioned += 1
                writer.write(result, sample)
            bar.update(1)
        writer.flush()
        pending.clear()

    try:
        for item in read_samples(shards):
            if isinstance(item, ShardProblem):
                failed += 1
                _report(item.name, str(item), errors_to)
            elif item.name not in writer.done:
                pending.append(item)
                if len(pending) == group:
                    run()
        if pending:
            run()
    finally:
        bar.close()
    return captioned, failed


def caption_files(captioner: Captioner, paths: list[str], writer: ResultWriter, *, method: str = "greedy",
                  batch_size: int = 32, workers: int | None = None, seed: int | None = None,
                  errors_to: IO[str] | None = None, progress: bool = True, **options) -> tuple[int, int]:
    """Captions `paths` not already in `writer.done`; -> (captioned, failed)."""
    todo = [p for p in paths if p not in writer.done]
    captioned = failed = 0
    bar = tqdm(total=len(todo), unit="img", desc="captioning", disable=not progress, file=sys.stderr)
    try:
        for result in captioner.caption_paths(todo, method, batch_size=batch_size, workers=workers, seed=seed,
                                              **options):
            if result.error:
                failed += 1
                _report(result.source, result.error, errors_to)
            else:
                captioned += 1
                writer.write(result)
            bar.update(1)
            if (captioned + failed) % batch_size == 0:
                writer.flush()
    finally:
        writer.flush()
        bar.close()
    return captioned, failed

