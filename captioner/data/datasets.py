"""Caption dataset readers: one reader per format, one record type out.

Formats: Flickr token files with split lists (Flickr8k/30k), Karpathy's split JSON, COCO caption
annotations, a plain CSV/JSONL of `image,caption[,split]`, and WebDataset shards
("shards/{00000..00099}.tar", images read in place). `load_dataset` detects which.
Problems (malformed lines, missing images, ...) are collected as "file:line: reason" and reported,
never silently dropped; `strict=True` turns any of them into an error. `load_datasets` reads several
(each its own format and image folder) as one, splits merged by name.

Caption styles need no per-dataset handling: COCO's mixed case and final period without a space,
and Flickr's tokenised "a dog runs .", become the same lowercase words in `vocab.tokenize`, which
training and every metric go through.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_file
from .shards import ShardMember, ShardProblem, expand, is_shard_spec, read_samples

SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "valid": "val",
                 "validation": "val", "test": "test"}
FORMATS = ("flickr", "karpathy", "coco", "csv", "jsonl", "webdataset")


class DatasetError(ValueError):
    pass


@dataclass
class ImageCaptions:
    image: Path | ShardMember
    captions: list[str]
    split: str | None = None
    dataset: str = ""  # the part of a combined dataset it came from


@dataclass
class CaptionDataset:
    source: Path
    format: str
    records: list[ImageCaptions]
    problems: list[str] = field(default_factory=list)
    # a combined dataset: each part's name -> (its annotation source, its format)
    sources: dict[str, tuple[Path, str]] = field(default_factory=dict)

    def split(self, name: str) -> list[ImageCaptions]:
        name = SPLIT_ALIASES.get(name, name)
        return [r for r in self.records if r.split == name]

    def parts(self) -> list[str]:
        """The names of the datasets combined in this one, in order ([""] for a single dataset)."""
        return list(dict.fromkeys(r.dataset for r in self.records))

    def summary(self) -> str:
        if len(self.parts()) > 1:
            lines = [f"{len(self.parts())} datasets, {len(self.records):,} images:"]
            for name in self.parts():
                part = CaptionDataset(*self.sources[name], [r for r in self.records if r.dataset == name])
                lines.append(f"  {name}: " + part.summary())
            if self.problems:
                lines.append(f"{len(self.problems):,} problem(s), first ones:")
                lines += [f"  {p}" for p in self.problems[:5]]
            return "\n".join(lines)
        splits = Counter(r.split or "none" for r in self.records)
        caps = Counter()
        for r in self.records:
            caps[r.split or "none"] += len(r.captions)
        parts = ", ".join(f"{s} {splits[s]:,} images / {caps[s]:,} captions" for s in sorted(splits))
        lines = [f"{self.source} ({self.format}): {len(self.records):,} images, "
                 f"{sum(caps.values()):,} captions; {parts}"]
        if self.problems:
            lines.append(f"{len(self.problems):,} problem(s), first ones:")
            lines += [f"  {p}" for p in self.problems[:5]]
        return "\n".join(lines)


def _read_text(path: Path, problems: list[str]) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        problems.append(f"{path}:{line}: not UTF-8 (byte {raw[err.start]:#x}); bad bytes replaced")
        text = raw.decode("utf-8-sig", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _Builder:
    """Collects captions per image in first-seen order, checking images exist."""

    def __init__(self, image_root: Path, problems: list[str]):
        self.root, self.problems = image_root, problems
        self.by_image: dict[str, ImageCaptions] = {}
        self.missing: set[str] = set()

    def add(self, name: str, caption: str, where: str, split: str | None = None) -> None:
        caption = caption.strip()
        if not caption:
            self.problems.append(f"{where}: empty caption for {name}")
            return
        if name in self.missing:
            return
        record = self.by_image.get(name)
        if record is None:
            path = self.root / name
            if not path.is_file():
                self.missing.add(name)
                self.problems.append(f"{where}: image {name} not found under {self.root}")
                return
            record = self.by_image[name] = ImageCaptions(path, [], split)
        if split is not None:
            record.split = split
        record.captions.append(caption)

    def records(self) -> list[ImageCaptions]:
        return list(self.by_image.values())


def _split_name(value: str, where: str, problems: list[str]) -> str | None:
    split = SPLIT_ALIASES.get(value.strip().lower())
    if split is None and value.strip():
        problems.append(f"{where}: unknown split {value!r} (expected train, val/dev or test)")
    return split


def _find_images_dir(root: Path) -> Path:
    for name in ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k_images"):
        if (root / name).is_dir():
            return root / name
    return root


FLICKR_TOKEN_FILES = ("captions.txt", "Flickr8k.token.txt", "results_20130124.token", "Flickr30k.token.txt")
FLICKR_SPLIT_FILES = {
    "train": ("train.txt", "Flickr_8k.trainImages.txt"),
    "val": ("dev.txt", "val.txt", "Flickr_8k.devImages.txt"),
    "test": ("test.txt", "Flickr_8k.testImages.txt"),
}


def read_flickr(token_file: Path, image_root: Path, split_files: dict[str, Path] | None = None) -> CaptionDataset:
    """`<image>#<n>\\t<caption>` lines, plus optional split lists (one image name a line)."""
    problems: list[str] = []
    builder = _Builder(image_root, problems)
    seen: set[str] = set()
    for n, line in enumerate(_read_text(token_file, problems).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{token_file}:{n}"
        key, sep, caption = line.partition("\t")
        name, hash_sep, _ = key.rpartition("#")
        if not sep or not hash_sep:
            problems.append(f"{where}: malformed line, expected '<image>#<n><TAB><caption>'")
            continue
        if key in seen:
            problems.append(f"{where}: duplicate key {key}")
            continue
        seen.add(key)
        builder.add(name.strip(), caption, where)
    records = {r.image.name: r for r in builder.records()}
    for split, path in (split_files or {}).items():
        for n, line in enumerate(_read_text(path, problems).split("\n"), 1):
            name = line.strip()
            if not name:
                continue
            if name not in records:
                if name not in builder.missing:
                    problems.append(f"{path}:{n}: split lists {name}, which has no captions")
                continue
            records[name].split = split
    return CaptionDataset(token_file, "flickr", builder.records(), problems)


def read_karpathy(json_file: Path, image_root: Path) -> CaptionDataset:
    """Karpathy's dataset_{flickr8k,flickr30k,coco}.json: images with filepath/filename, split, sentences."""
    problems: list[str] = []
    data = _load_json(json_file, problems)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{json_file}: expected a JSON object with an 'images' list (Karpathy split format)")
    builder = _Builder(image_root, problems)
    for i, entry in enumerate(images):
        where = f"{json_file}:images[{i}]"
        try:
            name = str(Path(entry.get("filepath", "")) / entry["filename"])
            split = _split_name(str(entry.get("split", "")), where, problems)
            sentences = entry["sentences"]
        except (KeyError, TypeError, AttributeError):
            problems.append(f"{where}: needs 'filename' and 'sentences'")
            continue
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if raw is None and isinstance(sentence, dict) and sentence.get("tokens"):
                raw = " ".join(sentence["tokens"])
            builder.add(name, raw or "", f"{where}.sentences[{j}]", split)
    return CaptionDataset(json_file, "karpathy", builder.records(), problems)


def read_coco(json_file: Path, image_root: Path, split: str | None = None) -> CaptionDataset:
    """COCO caption annotations (`captions_train2014.json`, ...): images + annotations lists."""
    problems: list[str] = []
    data = _load_json(json_file, problems)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{json_file}: expected COCO captions JSON with 'images' and 'annotations' lists")
    if split is None:
        stem = json_file.stem.lower()
        split = next((s for key, s in SPLIT_ALIASES.items() if key in stem), None)
    files = {}
    for i, img in enumerate(data["images"]):
        try:
            files[img["id"]] = img["file_name"]
        except (KeyError, TypeError):
            problems.append(f"{json_file}:images[{i}]: needs 'id' and 'file_name'")
    builder = _Builder(image_root, problems)
    for i, ann in enumerate(data["annotations"]):
        where = f"{json_file}:annotations[{i}]"
        try:
            image_id, caption = ann["image_id"], ann["caption"]
        except (KeyError, TypeError):
            problems.append(f"{where}: needs 'image_id' and 'caption'")
            continue
        if image_id not in files:
            problems.append(f"{where}: image_id {image_id} is not in 'images'")
            continue
        builder.add(files[image_id], str(caption), where, split)
    return CaptionDataset(json_file, "coco", builder.records(), problems)


def read_table(path: Path, image_root: Path) -> CaptionDataset:
    """CSV with a header, or JSONL: `image`, `caption` and optionally `split` per row."""
    problems: list[str] = []
    text = _read_text(path, problems)
    builder = _Builder(image_root, problems)
    if path.suffix.lower() == ".jsonl":
        fmt = "jsonl"
        rows = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
                rows.append((n, row))
            except ValueError as err:
                problems.append(f"{path}:{n}: not a JSON object ({err})")
    else:
        fmt = "csv"
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}:1: CSV header must name 'image' and 'caption' (got {reader.fieldnames})")
        rows = [(reader.line_num, row) for row in reader]
    for n, row in rows:
        where = f"{path}:{n}"
        if not isinstance(row.get("image"), str) or not isinstance(row.get("caption"), str):
            problems.append(f"{where}: needs string fields 'image' and 'caption'")
            continue
        split = _split_name(str(row.get("split") or ""), where, problems)
        builder.add(row["image"].strip(), row["caption"], where, split)
    return CaptionDataset(path, fmt, builder.records(), problems)


def read_shards(spec: str, index_dir: str | Path | None = None) -> CaptionDataset:
    """WebDataset shards ("shards/{00000..00099}.tar", as img2dataset writes them), indexed in one
    pass: each image stays in its shard, read in place when encoded. A sample's captions are KEY.txt's
    lines, else KEY.json's "captions" or "caption"; its split is KEY.json's "split" (a recipe can set
    one split for all of a dataset's samples instead).

    With `index_dir`, each shard's index (byte ranges and digests of its images, captions, splits,
    problems) is kept there as JSON, keyed by the shard's path, size and modification time: later
    runs read that instead of the shard."""
    problems: list[str] = []
    records = []
    for shard in expand(spec):
        for entry in _shard_index(shard, index_dir):
            if "problem" in entry:
                problems.append(entry["problem"])
                continue
            where = f"{shard}:{entry['key']}"
            split = entry["split"]
            split = _split_name(split, where, problems) if isinstance(split, str) else None
            records.append(ImageCaptions(ShardMember(shard, entry["key"], *entry["image"]), entry["captions"], split))
    return CaptionDataset(Path(spec), "webdataset", records, problems)


def _shard_index(shard: str, index_dir: str | Path | None) -> list[dict]:
    """One shard's samples as JSON-ready entries ({"problem": ...} for what cannot be used)."""
    stored = None
    if index_dir is not None and Path(shard).is_file():
        stat = Path(shard).stat()
        name = f"{Path(shard).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        stored = Path(index_dir) / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.json"
        try:
            return json.loads(stored.read_text(encoding="utf-8"))["entries"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not indexed yet, or a torn file: index the shard
    entries = []
    for item in read_samples([shard], need_caption=True, images_in_place=True):
        if isinstance(item, ShardProblem):
            entries.append({"problem": str(item)})
            continue
        image = item.image
        entries.append({"key": item.key, "image": [image.offset, image.size, image.digest],
                        "captions": item.captions, "split": item.metadata.get("split")})
    if stored is not None:
        text = json.dumps({"shard": shard, "entries": entries})
        atomic_file(stored, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return entries


def _load_json(path: Path, problems: list[str]):
    try:
        return json.loads(_read_text(path, problems))
    except ValueError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err


def detect_format(path: Path) -> str:
    if path.is_dir():
        if any((path / f).is_file() for f in FLICKR_TOKEN_FILES):
            return "flickr"
        raise DatasetError(f"{path}: no caption file found (looked for {', '.join(FLICKR_TOKEN_FILES)})")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        with path.open("rb") as f:
            head = f.read(4096)
        return "coco" if b'"annotations"' in head or b'"info"' in head or b'"licenses"' in head else "karpathy"
    if suffix in (".txt", ".token"):
        return "flickr"
    raise DatasetError(f"{path}: cannot tell the dataset format; pass --format ({', '.join(FORMATS)})")


def load_dataset(path: str | Path, images: str | Path | None = None, format: str | None = None,
                 strict: bool = False, shard_index: str | Path | None = None) -> CaptionDataset:
    """Reads a dataset from a directory (Flickr layout), an annotation file or WebDataset shards.

    `images` is the image folder; by default `images/` (or the Flickr names) beside the annotations.
    `shard_index`: where shards' indexes are kept between runs (`read_shards`).
    """
    if format == "webdataset" or (format is None and is_shard_spec(str(path))):
        missing = [shard for shard in expand(str(path)) if not Path(shard).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if missing[1:] else ""
            raise DatasetError(f"{missing[0]}: no such shard{more}")
        return _checked(read_shards(str(path), shard_index), path, strict)
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    base = path if path.is_dir() else path.parent
    image_root = Path(images) if images else _find_images_dir(base)
    if fmt == "flickr":
        token_file = next((base / f for f in FLICKR_TOKEN_FILES if (base / f).is_file()), None) if path.is_dir() else path
        if token_file is None:
            raise DatasetError(f"{path}: no Flickr token file ({', '.join(FLICKR_TOKEN_FILES)})")
        splits = {}
        for split, names in FLICKR_SPLIT_FILES.items():
            found = next((base / n for n in names if (base / n).is_file()), None)
            if found:
                splits[split] = found
        dataset = read_flickr(token_file, image_root, splits)
    elif fmt == "karpathy":
        dataset = read_karpathy(path, image_root)
    elif fmt == "coco":
        dataset = read_coco(path, image_root)
    else:
        dataset = read_table(path, image_root)
    return _checked(dataset, path, strict)


def _checked(dataset: CaptionDataset, path, strict: bool) -> CaptionDataset:
    if not dataset.records:
        raise DatasetError(f"{path}: no usable image/caption pairs\n{dataset.summary()}")
    if strict and dataset.problems:
        raise DatasetError(f"{path}: --strict and the dataset has problems\n{dataset.summary()}")
    return dataset


def dataset_name(spec: dict) -> str:
    """A recipe dataset's name: its `name`, else its folder's (the annotation file's folder)."""
    path = Path(spec["path"])
    return spec.get("name") or (path.name if path.is_dir() else path.parent.name)


def load_datasets(specs: list[dict], strict: bool = False, shard_index: str | Path | None = None) -> CaptionDataset:
    """Several datasets read as one: each spec is {path, images?, format?, name?, split?}; records keep
    the name of the dataset they came from (default: the path's folder name) and splits merge by
    name. `split` puts all of an entry's images in that split; entries that give the same `name`
    are one dataset (its train and dev shards listed apart, say)."""
    if not specs:
        raise DatasetError("no datasets given")
    records, problems, sources = [], [], {}
    named: set[str] = set()  # names given explicitly: entries sharing one are parts of one dataset
    for n, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            raise DatasetError(f"datasets[{n}]: needs a 'path' (and optionally 'images', 'format', 'name', 'split')")
        unknown = sorted(set(spec) - {"path", "images", "format", "name", "split"})
        if unknown:
            raise DatasetError(f"datasets[{n}]: unknown field(s) {', '.join(unknown)}")
        name = dataset_name(spec)
        if name in sources and not (spec.get("name") and name in named):
            raise DatasetError(f"datasets[{n}]: a second dataset named {name!r}; give each a 'name'")
        if spec.get("name"):
            named.add(name)
        split = spec.get("split")
        if split and split not in SPLIT_ALIASES:
            raise DatasetError(f"datasets[{n}]: unknown split {split!r} (expected train, val/dev or test)")
        part = load_dataset(spec["path"], spec.get("images"), spec.get("format"), strict, shard_index)
        sources.setdefault(name, (part.source, part.format))
        for record in part.records:
            record.dataset = name
            record.split = SPLIT_ALIASES[split] if split else record.split
        records += part.records
        problems += part.problems
    seen: dict[Path | ShardMember, str] = {}
    for record in records:
        key = record.image.resolve() if isinstance(record.image, Path) else record.image
        if key in seen and seen[key] != record.dataset:
            problems.append(f"{record.image}: in both {seen[key]} and {record.dataset}; kept twice")
        seen[key] = record.dataset
    fmt = next(iter(sources.values()))[1] if len(sources) == 1 else "combined"
    return CaptionDataset(Path(specs[0]["path"]), fmt, records, problems, sources)
