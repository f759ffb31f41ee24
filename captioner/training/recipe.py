"""A training recipe: every setting of `captioner train` as a plain value, read from a TOML file in
`train/` with command-line overrides."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from ..model.decoder import DecoderConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class TrainConfig:
    # data: one dataset, or `datasets` = [{path, images?, format?, name?}, ...] trained on as one
    # (splits merged by name; early stopping on the mean of the dev sets' CIDEr, each set counted once)
    dataset: str = "../shared/data/flickr8k"
    datasets: list = dataclasses.field(default_factory=list)
    images: str = ""  # image folder; default: found beside the annotations
    format: str = ""  # flickr | karpathy | coco | csv | jsonl; default: detected
    strict: bool = False  # refuse a dataset with any problem instead of training on the clean part
    output: str = "runs/flickr8k"
    cache_dir: str = "~/.cache/captioner/features"
    cache_chunk_mb: float = 256.0  # the feature cache's files: memory-mapped while training, one written at a time
    # encoder and preprocessing
    encoder: str = "efficientnet_lite0"
    encoder_weights: str = "DEFAULT"
    image_size: int = 224
    squash: bool = True  # resize the whole image to image_size x image_size (else shorter side + centre crop)
    flip: bool = True  # cache mirrored-image features too and train on both views
    # vocabulary
    min_count: int = 5
    max_vocab: int = 0  # 0: no limit
    max_caption_length: int = 20  # words kept per training caption
    # decoder
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1
    cell: str = "lstm"  # the recurrent cell: "lstm", "gru" or "rnn" (vanilla tanh)
    dropout: float = 0.5
    feature_dropout: float = 0.0
    image_feed: str = "state"
    tie_weights: bool = False
    members: int = 1  # an ensemble of decoders trained side by side
    attention_dim: int = 0  # > 0: the decoder also attends over the encoder's spatial map (cached instead)
    # image evidence (model/decoder.py): the encoder's ImageNet class probabilities, and concept detectors
    # for the most used content words of the training captions, trained beside the decoder
    labels: bool = False
    concepts: int = 0
    concept_min_images: int = 10  # a concept word is used by at least this many training images
    concept_loss_weight: float = 1.0
    evidence_weight: float = 0.0  # decoding: penalty on object words the image does not support
    evidence_threshold: float = 0.5
    # optimisation
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 300
    schedule: str = "cosine"  # cosine | plateau
    min_lr_ratio: float = 0.05
    clip_norm: float = 5.0  # the global gradient norm is clipped to this; 0: no clipping
    # every this many steps, record |dL/dh_t| through time on the batch (training/grad_flow.py; 0: never)
    grad_flow_every: int = 500
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # > 0: validate and keep an exponential moving average of the weights (e.g. 0.999)
    scheduled_sampling: float = 0.0  # probability of feeding the model's own prediction instead of the truth
    patience: int = 4  # epochs without a better validation CIDEr before stopping
    seed: int = 0
    # optional phase 2: fine-tune the encoder's last blocks with the decoder, from activations cached
    # where the frozen blocks end; warmup then cosine over its own epochs
    finetune_blocks: int = 0  # 0: no fine-tuning phase
    finetune_epochs: int = 4
    finetune_lr: float = 1e-4  # peak, encoder blocks
    finetune_decoder_lr: float = 1e-4  # peak, decoder
    # optional last phase: self-critical sequence training on CIDEr-D (captioner/training/self_critical.py)
    self_critical_epochs: int = 0  # 0: no self-critical phase
    self_critical_lr: float = 5e-5  # peak, warmup then cosine
    self_critical_samples: int = 5  # sampled captions per image; batch_size counts captions
    self_critical_xe_weight: float = 0.1  # adds this times the cross-entropy of a true caption per image
    # > 0: a sampled caption's reward also gains this for each object most of its image's references
    # name and loses it for each object none names (objects: the CHAIR table)
    self_critical_object_weight: float = 0.0
    # several datasets: each epoch draws as many images from each dataset (a small one's repeat, a
    # large one's are a random part), as validation weighs each dev set once
    self_critical_balanced: bool = False
    # photos without people: {dataset name: N} draws that dataset's training photos whose references
    # name no person (the CHAIR table's person group) N times as often, in the teacher-forced epochs
    # and the last phase ({}: every photo alike)
    person_free_weight: dict = dataclasses.field(default_factory=dict)
    # decoding for validation (greedy, every epoch) and the final test report
    max_length: int = 20
    eval_beam_size: int = 3
    length_penalty: float = 0.0
    # optional last step (fit_detectors.py; their penalties' weights are set at export, as the evidence
    # weight is): a person detector fitted on one dataset's training photos (its name; "": none) for
    # a penalty on words that name a person, and a detector for each other object of the table that
    # at least this many training photos' references name (0: none) for a penalty on its words
    person_detector_from: str = ""
    object_detector_photos: int = 0
    test_report: bool = True  # score best/ on the test split at the end
    objects: str = ""  # CHAIR table (COCO objects and their words): reward, detectors' words, the test report's figures
    # machinery
    device: str = "auto"
    precision: str = "auto"  # auto: bf16/fp16 autocast where the hardware is native (CUDA, AMX CPUs); or fp32
    workers: int = 1
    encode_batch_size: int = 64

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"{path}: cannot read recipe ({err})") from err
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}")
        config = cls(**{**data, **overrides})
        if not isinstance(config.datasets, list) or not all(isinstance(d, dict) for d in config.datasets):
            raise ValueError(f"{path}: datasets must be a list of tables, e.g. [[datasets]] path = \"...\"")
        return config

    def decoder_config(self, feature_dim: int, vocab_size: int) -> DecoderConfig:
        return DecoderConfig(feature_dim, vocab_size, embed_dim=self.embed_dim, hidden_dim=self.hidden_dim,
                             num_layers=self.num_layers, cell=self.cell, dropout=self.dropout,
                             feature_dropout=self.feature_dropout, image_feed=self.image_feed,
                             tie_weights=self.tie_weights, members=self.members, attention_dim=self.attention_dim,
                             labels=1000 if self.labels else 0, concepts=self.concepts,
                             evidence_weight=self.evidence_weight, evidence_threshold=self.evidence_threshold)

    @property
    def shard_index(self) -> Path:
        """Where shard datasets' indexes are kept between runs: beside the feature cache."""
        return Path(self.cache_dir).expanduser() / "shard-index"

    def dataset_specs(self) -> list[dict]:
        """The datasets to read, as `datasets.load_datasets` takes them."""
        if self.datasets:
            return [dict(d) for d in self.datasets]
        return [{"path": self.dataset, "images": self.images or None, "format": self.format or None}]
