"""The `captioner` command: caption, train, eval, export, explain, push, info, serve."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .grounding.evidence import GROUNDING
from .inference.engines import BACKENDS
from .model.runtime import PRECISIONS, keep_freed_memory

# the decoder's decoding settings a command line can override, and an export can set as the default
DECODING_DEFAULTS = {
    "evidence_weight": "penalty on object words the image does not support",
    "evidence_threshold": "support below which an object word is penalised",
    "person_weight": "penalty on words that name a person where the checkpoint's person detector sees none (it "
                     "needs a person detector: the recipe's person_detector_from)",
    "person_threshold": "the person detector's probability below which words that name a person are penalised",
    "object_weight": "penalty on words that name an object where the checkpoint's detector for it doubts it (it "
                     "needs object detectors: the recipe's object_detector_photos)",
    "object_threshold": "an object detector's probability below which its words are penalised",
    "include_threshold": "beam search with --grounding full: how probable (calibrated) an object the encoder's "
                         "classifier sees must be to be required in the caption (0: none is)",
    "max_constraints": "beam search with --grounding full: the most objects required in one caption",
    "include_cost": "beam search with --grounding full: the most log-probability (nats) the required objects may "
                    "cost the caption against the best one found without them",
    "consensus_samples": "beam search: re-rank the beams by their agreement with this many of the decoder's own "
                         "samples (0: off)",
}
INTEGER_SETTINGS = {"max_constraints", "consensus_samples"}

EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED = 0, 1, 2


class UsageError(ValueError):
    pass


def _add_decoding_options(p: argparse.ArgumentParser, default_method: str = "greedy") -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--method", choices=("greedy", "sample", "beam"), default=default_method)
    g.add_argument("--beam-size", type=int, default=3)
    g.add_argument("--length-penalty", type=float, default=0.0, help="beam ranking: logprob / ((5+len)/6)^alpha")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--max-length", type=int, default=20, help="most tokens generated, <end> included")
    g.add_argument("--grounding", choices=GROUNDING, default="full",
                   help="what the image's evidence does: off; avoid: keep out the words it does not support and "
                        "name the animal the encoder's classifier recognises; full: also bring in, in beam search, "
                        "the objects it surely shows (default)")
    for setting, meaning in DECODING_DEFAULTS.items():
        g.add_argument("--" + setting.replace("_", "-"), type=int if setting in INTEGER_SETTINGS else float,
                       default=None, help=f"expert: {meaning} (default: the checkpoint's)")
    g.add_argument("--no-animal-names", dest="name_animals", action="store_false", default=None,
                   help="keep the decoder's animal word where the encoder's classifier is sure of another")


def _decoding_options(args) -> dict:
    from .pipeline import METHOD_OPTIONS

    every_method = {k: getattr(args, k) for k in DECODING_DEFAULTS
                    if getattr(args, k) is not None}
    every_method.update(grounding=args.grounding,
                        name_animals=args.grounding != "off" if args.name_animals is None else args.name_animals)
    return {**{k: getattr(args, k) for k in METHOD_OPTIONS[args.method]}, **every_method}


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: the encoder and the decoder step's weights in bf16/fp16 where the hardware is "
                        "native (CUDA, AMX CPUs)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="where the encoder runs; auto: the fastest installed (OpenVINO, ONNX Runtime, PyTorch)")
    p.add_argument("--no-fold", dest="fold", action="store_false",
                   help="run the modules exactly as trained: no folded batch norm or padding, nn.LSTM steps")


def _load(args):
    from .pipeline import Captioner

    return Captioner.from_pretrained(args.checkpoint, device=args.device, precision=args.precision,
                                     backend=args.backend, fold=args.fold)


def cmd_caption(args) -> int:
    from .batch import caption_files, caption_shards, collect_paths, open_writer, shard
    from .data.shards import expand, is_shard_spec

    shard_specs = [p for p in args.paths if is_shard_spec(p)]
    if shard_specs and (len(shard_specs) != len(args.paths) or args.from_list):
        raise UsageError("give either WebDataset shards or image files and folders, not both")
    try:
        paths = ([s for spec in shard_specs for s in expand(spec)] if shard_specs
                 else collect_paths(args.paths, args.recursive, args.glob, args.from_list))
        if args.shard:  # of shards, whole shards
            paths = shard(paths, args.shard)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not paths:
        raise UsageError("no images found in the given paths")
    if args.resume and args.out in (None, "-"):
        raise UsageError("--resume needs --out FILE to know what is already done")
    captioner = _load(args)
    options = _decoding_options(args)
    errors = open(args.errors, "a", encoding="utf-8") if args.errors else None
    progress = not args.quiet and (args.out not in (None, "-") or not sys.stdout.isatty())
    # Without --out: plain "path<TAB>caption" lines on stdout.
    if args.ray is not None and (args.out or "").endswith(".tar"):
        raise UsageError("--ray writes JSONL, CSV or a .parquet folder; shard output runs without --ray")
    if args.ray is not None and args.resume and shard_specs:
        raise UsageError("--resume with --ray works on image files; for shards, rerun the shards that failed")
    try:
        if (args.out or "").endswith(".parquet"):
            if args.ray is None:
                raise ValueError("a .parquet folder is written by --ray; without it use .jsonl or .csv")
            writer = None
        else:
            writer = open_writer(args.out or "-", {"method": args.method, "options": options}, resume=args.resume,
                                 format=None if args.out else "tsv")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if writer is not None and writer.done:
        print(f"resuming: {len(writer.done):,} image(s) already in {args.out}", file=sys.stderr)
    common = dict(method=args.method, batch_size=args.batch_size, seed=args.seed, errors_to=errors,
                  progress=progress, labels=args.labels, **options)
    try:
        if args.ray is not None:
            failed = _caption_on_ray(args, paths, bool(shard_specs), writer, options, errors)
        elif shard_specs:
            _, failed = caption_shards(captioner, paths, writer, **common)
        else:
            _, failed = caption_files(captioner, paths, writer, workers=args.workers, **common)
    finally:
        if writer is not None:
            writer.close()
        if errors:
            errors.close()
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _caption_on_ray(args, paths: list[str], shards: bool, writer, options: dict, errors) -> int:
    try:
        from .ray_batch import caption_with_ray
    except ImportError as err:
        raise UsageError(f"--ray needs Ray Data: pip install 'captioner[ray]' ({err})") from None
    todo = paths if writer is None else [p for p in paths if p not in writer.done]
    _, failed = caption_with_ray(todo, shards, args.out or "-", writer, address=args.ray or None,
                                 checkpoint=args.checkpoint, precision=args.precision, backend=args.backend,
                                 actors=args.ray_actors, gpus_per_actor=args.ray_gpus, method=args.method,
                                 batch_size=args.batch_size, seed=args.seed, labels=args.labels, errors_to=errors,
                                 **options)
    return failed


def _train_parser(sub) -> argparse.ArgumentParser:
    from .training.recipe import TrainConfig

    p = sub.add_parser("train", help="train a decoder on a caption dataset",
                       description="Train from a TOML recipe (train/*.toml); any recipe field can be overridden "
                                   "with --field-name VALUE.")
    p.add_argument("recipe", nargs="?", help="TOML recipe, e.g. train/flickr8k.toml")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last exactly where it stopped")
    for field in dataclasses.fields(TrainConfig):
        if field.default is dataclasses.MISSING:
            continue  # `datasets`, a list of tables: recipe files only
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            p.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, dest=field.name, type=type(field.default), default=None, metavar=field.name.upper())
    return p


def cmd_train(args) -> int:
    from .scoring import report_test
    from .training.loop import train
    from .training.recipe import TrainConfig

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    config = TrainConfig.from_toml(args.recipe, **overrides) if args.recipe else TrainConfig(**overrides)
    best = train(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        if config.test_report:
            report_test(config, best, Path(config.output) / "test")
        print(f"best checkpoint: {best}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from .data.datasets import load_dataset
    from .scoring import evaluate, format_report
    from .training.recipe import TrainConfig

    captioner = _load(args)
    # shards are indexed where training keeps their indexes (the recipe's default cache): a shard
    # trained on, or scored before, is not read again to know what it holds
    data = load_dataset(args.dataset, args.images, args.format, shard_index=TrainConfig().shard_index)
    report = evaluate(captioner, data, args.split, method=args.method, out_dir=args.out,
                      batch_size=args.batch_size, workers=args.workers, limit=args.limit, objects=args.objects,
                      **_decoding_options(args))
    print(format_report(report))
    if args.out:
        print(f"wrote {Path(args.out) / 'predictions.jsonl'} and {Path(args.out) / 'scores.json'}")
    return EXIT_OK


def cmd_export(args) -> int:
    import torch

    from .model.ensemble import keep_members
    from .pipeline import Captioner
    from .scoring import report_test
    from .training.recipe import TrainConfig

    captioner = Captioner.from_pretrained(args.checkpoint, device="cpu")
    if args.onnx and captioner.decoder.config.cell != "lstm":
        raise UsageError(f"--onnx: the ONNX decoder graphs are LSTM ones; {args.checkpoint} has a "
                         f"{captioner.decoder.config.cell.upper()} decoder (it captions with PyTorch)")
    training = {k: v for k, v in captioner.config.get("training", {}).items() if k != "test"}
    if args.members:
        captioner.decoder = keep_members(captioner.decoder, args.members)
        training["members_kept"] = args.members
    if args.calibrate and not args.objects:
        raise UsageError("--calibrate needs --objects (the CHAIR table)")
    if args.objects:
        from .evaluation.hallucination import ObjectTable
        from .grounding.detectors import named_once

        table = ObjectTable.load(args.objects)
        captioner.decoder.config.named_once = named_once(captioner.vocab, table)
    if args.calibrate:
        from .data.datasets import load_dataset
        from .training.fit_detectors import calibrate_label_objects

        records = [r for path in args.calibrate for r in load_dataset(path).split("val")]
        good, features = captioner.encode_files([r.image for r in records])
        records = [records[i] for i in good]
        label_probs = captioner.encoder.label_probs(captioner._pooled(features))
        captioner.decoder.config.label_objects = calibrate_label_objects(
            captioner.decoder, captioner.vocab, features, label_probs, [r.captions for r in records], table)
        training["label_objects_from"] = {Path(p).name: "val" for p in args.calibrate}
    for setting in DECODING_DEFAULTS:
        if getattr(args, setting) is not None:  # the decoding default the exported model carries
            setattr(captioner.decoder.config, setting, getattr(args, setting))
            training[setting] = getattr(args, setting)
    dtype = torch.float16 if args.fp16 else torch.float32
    out = captioner.save_pretrained(args.out, training=training, dtype=dtype)
    if args.onnx:
        from .inference.onnx_captioner import FILES
        from .inference.onnx_export import export_decoder, export_encoder

        # from the files just written, so the graphs hold exactly the weights shipped (fp16 ones too)
        shipped = Captioner.from_pretrained(out, device="cpu", backend="torch")
        export_encoder(shipped.encoder, out / FILES["encoder"], spatial=shipped.decoder.config.takes_map)
        export_decoder(shipped.decoder, out)
    if args.score:
        recipe = TrainConfig(**{**training["recipe"], **({"dataset": args.dataset} if args.dataset else {})})
        report_test(recipe, out, Path(args.score), dtype=dtype)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    return EXIT_OK


def cmd_explain(args) -> int:
    from .data.images import load_image
    from .inference.explain import overlay

    captioner = _load(args)
    explanation = captioner.explain(args.image, caption=args.caption, method=args.method, maps=args.maps,
                                    **_decoding_options(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photo = load_image(args.image)
    record = explanation.to_dict()
    for i, (word, entry) in enumerate(zip(explanation.words, record["words"]), 1):
        name = f"{i:02d}_{''.join(c for c in word.word if c.isalnum()) or 'word'}.png"
        overlay(photo, word.heatmap).save(out / name)
        entry["overlay"] = name
    (out / "explanation.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(explanation.caption)
    for word in explanation.words:
        others = ", ".join(f"{w} {p:.2f}" for w, p in word.alternatives)
        wrote = f" (the decoder wrote {word.decoder_word!r})" if word.decoder_word else ""
        print(f"  {word.word:<12} {word.probability:.2f}   instead: {others}{wrote}")
    print(f"wrote {len(explanation.words)} overlays and explanation.json to {out}")
    return EXIT_OK


def cmd_push(args) -> int:
    from .model.hub import push

    print(push(args.checkpoint, args.repo, private=args.private, revision=args.revision))
    return EXIT_OK


def readable_json(value, indent: str = "") -> str:
    """JSON indented by level, but a list of numbers or strings on one line: a checkpoint's class
    lists and gradient records would otherwise take a line per number."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = (f"{inner}{json.dumps(key)}: {readable_json(item, inner)}" for key, item in value.items())
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(inner + readable_json(item, inner) for item in value) + f"\n{indent}]"
    return json.dumps(value)


def cmd_info(args) -> int:
    from .model.checkpoint import read_config
    from .pipeline import BUILTIN, PRETRAINED_DIR

    path = PRETRAINED_DIR / BUILTIN if args.checkpoint in (None, BUILTIN) else args.checkpoint
    config = read_config(path)
    print(readable_json(config))
    flows = config.get("training", {}).get("grad_flow")
    if flows:  # on stderr: stdout stays one JSON document
        last = flows[-1]
        reach = (f", the last word's |dl_T/dh_1| / |dl_T/dh_T| = {last['ratio_last_word']:.4g}"
                 if "ratio_last_word" in last else "")
        if "ratio_last_word_cell" in last:
            reach += f", |dl_T/dc_1| / |dl_T/dh_T| = {last['ratio_last_word_cell']:.4g}"
        print(f"{config['decoder'].get('cell', 'lstm').upper()}: |dL/dh_1| / |dL/dh_T| = {last['ratio_first_last']:.4g}"
              f"{reach} at step {last['step']} (T = {len(last['dL_dh'])}; {len(flows)} records)", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description="Image captioning: CNN encoder + LSTM decoder.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption image files and folders",
                       description="Exit status: 0 all images captioned, 2 some images failed (each reported "
                                   "on stderr), 1 usage error.")
    p.add_argument("paths", nargs="*", help="image files or folders, or WebDataset shards ('shards/{00000..00099}.tar')")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--glob", default=None, help='file pattern inside folders, e.g. "*.jpg" (default: image suffixes)')
    p.add_argument("--from-list", default=None, metavar="FILE", help="read paths one a line from FILE, or - for stdin")
    p.add_argument("--out", default=None, help="captions.jsonl, captions.csv, - for JSONL on stdout, or "
                                               "shards 'out/{00000..}.tar' (default: 'path<TAB>caption' lines)")
    p.add_argument("--resume", action="store_true", help="skip images already in --out; repair a torn last line")
    p.add_argument("--errors", default=None, metavar="FILE", help="also append failures to this JSONL file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding processes (default: 0, i.e. this process, on 2 cores or fewer; else 1)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (each file: seed + CRC32 of its path)")
    p.add_argument("--labels", type=int, default=0, metavar="K",
                   help="JSONL only: add each image's top-K ImageNet labels (what the encoder sees)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="caption on a Ray cluster through Ray Data: 'auto' (the running cluster), an address, "
                        "or nothing for a local Ray started for this run (pip install 'captioner[ray]')")
    p.add_argument("--ray-actors", type=int, default=None, help="captioner actors (default: one per CPU)")
    p.add_argument("--ray-gpus", type=float, default=0, help="GPUs per actor")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="caption only part I (0-based) of N of the inputs: N such runs cover each input once")
    _add_device_options(p)
    _add_decoding_options(p)
    p.set_defaults(func=cmd_caption)

    p = _train_parser(sub)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a checkpoint on a dataset split (pycocoevalcap)")
    p.add_argument("checkpoint", help="checkpoint directory, or 'flickr8k_coco' for the built-in model")
    p.add_argument("--dataset", required=True)
    p.add_argument("--images", default=None)
    p.add_argument("--format", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help="folder for predictions.jsonl and scores.json")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, default=None, help="as for caption")
    p.add_argument("--limit", type=int, default=0, help="score only the first N images")
    p.add_argument("--objects", default=None, metavar="SYNONYMS",
                   help="CHAIR table of COCO objects and their words (e.g. ../shared/data/coco_objects/synonyms.txt): "
                        "also report object hallucination (CHAIRs, CHAIRi) and object recall")
    _add_device_options(p)
    _add_decoding_options(p, default_method="beam")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="copy a checkpoint for shipping: fp16, fewer ensemble members, rescored")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")
    p.add_argument("--onnx", action="store_true",
                   help="also write encoder.onnx, decoder_start.onnx and decoder_step.onnx (dynamic batch; "
                        "weights both decoder graphs use in decoder_shared.weights) for ONNX Runtime, OpenVINO "
                        "or captioner.inference.onnx_captioner")
    p.add_argument("--members", type=int, default=0, help="keep only the first N decoders of an ensemble")
    p.add_argument("--score", default=None, metavar="DIR",
                   help="score the exported model on its recipe's test split, record it in its config, "
                        "and write predictions and scores to DIR")
    p.add_argument("--dataset", default=None, help="with --score: the dataset, if not where the recipe had it")
    for setting, meaning in DECODING_DEFAULTS.items():
        p.add_argument("--" + setting.replace("_", "-"), type=int if setting in INTEGER_SETTINGS else float,
                       default=None, help=f"the default the exported model carries: {meaning}")
    p.add_argument("--calibrate", action="append", default=None, metavar="DATASET",
                   help="fit which objects the encoder's classifier vouches for, and how surely, on this dataset's "
                        "dev split (repeatable), for --include-threshold; needs --objects")
    p.add_argument("--objects", default=None,
                   help="the CHAIR table (synonyms.txt): the objects --calibrate fits and a caption names once")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("explain", help="per-word heat maps and word probabilities of one image's caption")
    p.add_argument("image")
    p.add_argument("--out", required=True, help="folder for one overlay PNG per word and explanation.json")
    p.add_argument("--caption", default=None, help="explain this caption instead of the model's own")
    p.add_argument("--maps", choices=("auto", "grad-cam", "attention"), default="auto",
                   help="auto: attention weights for a decoder with attention, else Grad-CAM")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the built-in model)")
    _add_device_options(p)
    _add_decoding_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("push", help="upload a checkpoint and a generated model card to the Hugging Face Hub")
    p.add_argument("checkpoint")
    p.add_argument("repo", help="org/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("info", help="print a checkpoint's config")
    p.add_argument("checkpoint", nargs="?", default=None)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="serve the JSON HTTP API (POST /v1/captions)",
                       description="Answers this machine only unless --host says otherwise; add --auth then.")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--auth", action="append", metavar="USER:PASSWORD",
                   help="require HTTP Basic credentials (repeat for more users)")
    p.add_argument("--auth-file", default=None, help="USER:PASSWORD lines, for passwords kept off the command line")
    p.add_argument("--max-batch", type=int, default=32,
                   help="most images in one model call (with --ray: most requests in one batch)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for others to batch with")
    p.add_argument("--max-images", type=int, default=32, help="most images in one request")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="largest image file accepted")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="deploy on Ray Serve: a local Ray, or the cluster at ADDRESS ('auto': the running one)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: copies of the model serving requests")
    _add_device_options(p)
    p.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args) -> int:
    import logging

    from .pipeline import BUILTIN
    from .server import read_credentials, serve_local, serve_on_ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    api_options = {"credentials": read_credentials(args.auth, args.auth_file), "max_images": args.max_images,
                   "max_upload_mb": args.max_upload_mb}
    name = args.checkpoint or BUILTIN
    if args.ray is not None:
        load_options = {"device": args.device, "precision": args.precision, "backend": args.backend, "fold": args.fold}
        serve_on_ray(args.ray, args.host, args.port, args.checkpoint, name, load_options, replicas=args.replicas,
                     max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, **api_options)
        return EXIT_OK
    from PIL import Image

    captioner = _load(args)
    captioner.caption(Image.new("RGB", (64, 64)))  # builds the encoder's engine before the first request
    serve_local(captioner, name, args.host, args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                **api_options)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # our own process: faster CPU inference and training (captioner/model/runtime.py)
    from .data.datasets import DatasetError
    from .data.images import ImageError
    from .model.checkpoint import CheckpointError
    from .model.encoders import EncoderWeightsError

    try:
        return args.func(args)
    except (CheckpointError, DatasetError, EncoderWeightsError, ImageError, ValueError, FileNotFoundError) as err:
        print(f"captioner {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
