"""Batch captioning on a Ray cluster through Ray Data: inputs (image files, or WebDataset shards whole)
-> `map_batches` over a pool of captioner actors (the model loaded once per actor, on CPU or GPU)
-> JSONL or CSV written by the driver as results arrive (so --resume works as without Ray), or a
Parquet folder written by the cluster. Nothing here is imported unless `--ray` asks for it
(`pip install 'captioner[ray]'`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import IO

import numpy as np

from .batch import _report
from .data.shards import Sample, ShardProblem, read_samples
from .grounding.labels import Label
from .pipeline import Captioner, GeneratedCaption, ImageResult

# `labels`: the image's top ImageNet labels as a JSON list ("" without --labels, or on error): a string,
# so that the column has one type in every batch, whatever the batch holds
RESULT_COLUMNS = ("image", "shard", "key", "caption", "logprob", "labels", "error")


class CaptionActor:
    """One model per actor; each call captions a batch of files, or every sample of the shards in it."""

    def __init__(self, checkpoint, precision, backend, threads, method, options, batch_size, seed, labels):
        import torch

        torch.set_num_threads(threads)
        self.captioner = Captioner.from_pretrained(checkpoint, precision=precision, backend=backend)
        self.method, self.options, self.batch_size, self.seed, self.labels = method, options, batch_size, seed, labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = {column: [] for column in RESULT_COLUMNS}

        def add(image, shard="", key="", caption="", logprob=float("nan"), labels="", error=""):
            for column, value in zip(RESULT_COLUMNS, (image, shard, key, caption, logprob, labels, error)):
                rows[column].append(value)

        if "shard" in batch:
            samples = []
            for item in read_samples([str(s) for s in batch["shard"]]):
                if isinstance(item, ShardProblem):
                    add(item.name, item.shard, item.key or "", error=str(item))
                else:
                    samples.append(item)
            sources, names = [s.image for s in samples], [s.name for s in samples]
            where = [(s.shard, s.key) for s in samples]
        else:
            sources = names = [str(p) for p in batch["path"]]
            where = [("", "")] * len(names)
        results = self.captioner.caption_paths(sources, self.method, batch_size=self.batch_size, workers=0,
                                               seed=self.seed, labels=self.labels, names=names, **self.options)
        for (shard, key), result in zip(where, results):
            if result.error:
                add(result.source, shard, key, error=result.error)
            else:
                best = result.captions[0]
                labels = json.dumps([dataclasses.asdict(label) for label in result.labels]) if result.labels else ""
                add(result.source, shard, key, best.text, round(best.logprob, 4), labels)
        return rows


def caption_with_ray(inputs: list[str], shards: bool, out: str, writer=None, *, address: str | None = None,
                     checkpoint: str | None = None, precision: str = "auto", backend: str = "auto",
                     actors: int | None = None, cpus_per_actor: float = 1, gpus_per_actor: float = 0,
                     method: str = "greedy", batch_size: int = 32, files_per_task: int = 64, seed: int | None = None,
                     labels: int = 0, errors_to: IO[str] | None = None, **options) -> tuple[int, int]:
    """Captions `inputs` (file paths, or shard paths with `shards`) on the Ray cluster at `address`
    ("auto": the running cluster; None: a local Ray started for this run) with `actors` captioner
    actors (default: one per `cpus_per_actor` CPUs of the cluster). Results go to `writer` (JSONL/CSV,
    on the driver) or, for an `out` ending in ".parquet", to that folder. -> (captioned, failed)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        if actors is None:
            actors = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))
        rows = [{"shard": s} for s in inputs] if shards else [{"path": p} for p in inputs]
        dataset = ray.data.from_items(rows).map_batches(
            CaptionActor, batch_size=1 if shards else files_per_task, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
            fn_constructor_kwargs=dict(checkpoint=checkpoint, precision=precision, backend=backend,
                                       threads=max(1, int(cpus_per_actor)), method=method, options=options,
                                       batch_size=batch_size, seed=seed, labels=labels))
        if out.endswith(".parquet"):
            dataset = dataset.materialize()
            dataset.write_parquet(out)
            failed = dataset.filter(lambda row: bool(row["error"])).count()
            return dataset.count() - failed, failed
        return _write_rows(dataset.iter_rows(), writer, errors_to)
    finally:
        if started:
            ray.shutdown()


def _write_rows(rows, writer, errors_to) -> tuple[int, int]:
    captioned = failed = 0
    for row in rows:
        if row["error"]:
            failed += 1
            _report(row["image"], row["error"], errors_to)
            continue
        caption = GeneratedCaption(row["caption"], row["caption"].split(), float(row["logprob"]), [], True)
        sample = Sample(row["shard"], row["key"]) if row["shard"] else None
        labels = [Label(**label) for label in json.loads(row["labels"])] if row["labels"] else None
        writer.write(ImageResult(row["image"], [caption], labels=labels), sample)
        captioned += 1
        if captioned % 256 == 0:
            writer.flush()
    writer.flush()
    print(f"ray: {captioned} captioned, {failed} failed", file=sys.stderr)
    return captioned, failed
