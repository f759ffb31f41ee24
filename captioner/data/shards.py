"""WebDataset shards, as img2dataset writes them: tar files whose members are grouped by key
(`KEY.jpg` or `.png`/`.webp` beside `KEY.txt` and/or `KEY.json` with a "caption" field). Read with
the standard library's `tarfile` in stream mode, member by member, never unpacked to disk; written
the same way, so a recaptioned copy of a dataset is one `captioner caption ... --out 'x/{00000..}.tar'`.
Training indexes shards instead: each image stays in its shard as a `ShardMember` (where its bytes
lie), read in place whenever it is encoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand(spec: str) -> list[str]:
    """WebDataset's brace notation: "a/{00000..00002}.tar" -> a/00000.tar, a/00001.tar, a/00002.tar
    (zero-padded as the first bound is), "{x,y}" -> alternatives; several braces multiply."""
    match = _BRACES.search(spec)
    if not match:
        return [spec]
    body, head, tail = match.group(1), spec[:match.start()], spec[match.end():]
    if ".." in body:
        low, high = body.split("..", 1)
        if not (low.isdigit() and high.isdigit()):
            raise ValueError(f"{spec!r}: a brace range is {{00000..00099}}, digits on both sides")
        options = [str(i).zfill(len(low)) for i in range(int(low), int(high) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand(head + option + tail)]


def is_shard_spec(path: str) -> bool:
    return expand(path)[0].endswith(".tar") if path else False


@dataclass(frozen=True)
class ShardMember:
    """An image inside an uncompressed shard, read in place: the shard and the member's byte range,
    and a digest of its bytes (taken while indexing, so that caches key it by content without
    reading it again)."""

    shard: str
    key: str
    offset: int
    size: int
    digest: str

    def __str__(self) -> str:
        return f"{self.shard}:{self.key}"

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self}: the shard ends inside this member ({len(data):,} of {self.size:,} bytes)")
        return data


@dataclass
class Sample:
    shard: str
    key: str
    files: dict[str, bytes | ShardMember] = field(default_factory=dict)  # extension -> content (or where it lies)

    @property
    def name(self) -> str:
        """How results and errors name the sample: shard and key."""
        return f"{self.shard}:{self.key}"

    @property
    def image_extension(self) -> str | None:
        return next((ext for ext in IMAGE_EXTENSIONS if ext in self.files), None)

    @property
    def image(self) -> bytes | ShardMember | None:
        ext = self.image_extension
        return self.files[ext] if ext else None

    @property
    def caption(self) -> str | None:
        if "txt" in self.files:
            return self.files["txt"].decode("utf-8", errors="replace").strip()
        caption = self.metadata.get("caption")
        return caption if isinstance(caption, str) else None

    @property
    def captions(self) -> list[str]:
        """Every caption of the sample, for training: KEY.txt's lines, else KEY.json's "captions"
        list or its "caption"."""
        if "txt" in self.files:
            return [line.strip() for line in self.caption.splitlines() if line.strip()]
        captions = self.metadata.get("captions")
        if isinstance(captions, list) and all(isinstance(c, str) for c in captions):
            return [c for c in captions if c.strip()]
        return [self.caption] if self.caption else []

    @property
    def metadata(self) -> dict:
        """KEY.json as a dict ({} when absent or not a JSON object)."""
        try:
            data = json.loads(self.files.get("json", b"{}"))
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}


@dataclass
class ShardProblem:
    """Something in a shard that cannot be used; the run reports it and goes on."""

    shard: str
    key: str | None
    message: str

    @property
    def name(self) -> str:
        return f"{self.shard}:{self.key}" if self.key else self.shard

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


def content_digest(data: bytes) -> str:
    """How caches identify an image: by its bytes, wherever they lie."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _split(member_name: str) -> tuple[str, str]:
    """"dir/KEY.ext" -> ("dir/KEY", "ext"): the key ends at the first dot of the file name."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_samples(shards: list[str], need_caption: bool = False,
                 images_in_place: bool = False) -> Iterator[Sample | ShardProblem]:
    """Samples in shard order, each as soon as its members have been read. A sample without an
    image, or (with `need_caption`) without a caption, and a shard that is missing or truncated
    come as `ShardProblem`s; reading goes on with the next sample or shard.

    `images_in_place`: a sample's image is its `ShardMember`, not its bytes, so that an index of a
    large dataset holds no images; the shards must then be uncompressed .tar (offsets into a
    compressed stream cannot be read in place)."""
    for shard in shards:
        current: Sample | None = None
        try:
            with tarfile.open(shard, mode="r|" if images_in_place else "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split(member.name)
                    if current is not None and key != current.key:
                        yield _checked(current, need_caption)
                        current = None
                    if current is None:
                        current = Sample(shard, key)
                    data = tar.extractfile(member).read()
                    if images_in_place and ext in IMAGE_EXTENSIONS:
                        data = ShardMember(shard, key, member.offset_data, member.size, content_digest(data))
                    current.files[ext] = data
        except (OSError, tarfile.TarError, EOFError) as err:
            # the sample being read when the shard broke is incomplete: reported, not captioned
            where = f" after {current.key}" if current is not None else ""
            hint = "; shards read in place must be uncompressed .tar" if images_in_place and current is None else ""
            yield ShardProblem(shard, current.key if current else None,
                               f"unreadable shard{where} ({type(err).__name__}: {err}){hint}")
            continue
        if current is not None:
            yield _checked(current, need_caption)


def _checked(sample: Sample, need_caption: bool) -> Sample | ShardProblem:
    if sample.image is None:
        members = ", ".join(f".{ext}" for ext in sample.files)
        return ShardProblem(sample.shard, sample.key, f"no image (members: {members})")
    if need_caption and not sample.captions:
        return ShardProblem(sample.shard, sample.key, "no caption (.txt, or .json with a 'caption' field)")
    return sample


class ShardWriter:
    """Writes samples into numbered shards, `per_shard` samples each: "out/{00000..}.tar" (an
    open-ended brace) numbers from 00000 on; each shard is written to a temporary name and renamed
    when complete, so a reader never sees half a shard."""

    def __init__(self, pattern: str, per_shard: int = 10_000):
        match = _BRACES.search(pattern)
        if not match or not re.fullmatch(r"\d+\.\.", match.group(1)):
            raise ValueError(f"{pattern!r}: shard output is a pattern like 'out/{{00000..}}.tar'")
        start = match.group(1)[:-2]
        self.head, self.tail, self.width, self.number = pattern[:match.start()], pattern[match.end():], len(start), int(start)
        self.per_shard, self.count, self.tar, self.path = per_shard, 0, None, None
        self.written: list[str] = []

    def _open(self) -> None:
        self.path = Path(f"{self.head}{str(self.number).zfill(self.width)}{self.tail}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tar = tarfile.open(self.path.with_name(self.path.name + ".tmp"), "w")

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self.tar is None:
            self._open()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        if self.count == self.per_shard:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.path.with_name(self.path.name + ".tmp").replace(self.path)
        self.written.append(str(self.path))
        self.tar, self.count, self.number = None, 0, self.number + 1

    def close(self) -> None:
        self.finish_shard()
