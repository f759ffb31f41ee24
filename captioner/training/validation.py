"""What every training phase does after an epoch: decode the dev split(s) for real and score them,
log the epoch (metrics.jsonl, curves.png), and keep a phase's best checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data.atomic import atomic_file
from ..data.vocab import Vocabulary
from ..evaluation.metrics import caption_stats, score_captions
from ..inference import decoding
from ..model.checkpoint import save_checkpoint
from ..model.decoder import CaptionDecoder
from ..model.encoders import Encoder
from .distributed import log
from .recipe import TrainConfig


@torch.no_grad()
def decode_features(decoder: CaptionDecoder, features: torch.Tensor, vocab: Vocabulary, device: torch.device,
                    max_length: int = 20, batch_size: int = 500):
    """Greedy captions for a stack of features -> (texts, ended flags)."""
    decoder.eval()
    texts, ended = [], []
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size].to(device).float()
        for [caption] in decoding.greedy(decoder, chunk, max_length=max_length):
            texts.append(vocab.sentence(vocab.words(caption.tokens))[1])
            ended.append(caption.ended)
    return texts, ended


def validate(decoder, features, records, vocab, device, config: TrainConfig) -> dict:
    """Greedy captions of the dev split(s), scored. With several datasets each dev set is scored on
    its own ("CIDEr flickr8k", ...) and BLEU-4 and CIDEr are their means: a small dev set counts as
    much as a large one, so early stopping cannot trade one domain for the other's size."""
    texts, ended = decode_features(decoder, features, vocab, device, max_length=config.max_length)
    parts = list(dict.fromkeys(r.dataset for r in records))
    result: dict = {}
    for part in parts:
        predictions = {str(r.image): t for r, t in zip(records, texts) if r.dataset == part}
        references = {str(r.image): r.captions for r in records if r.dataset == part}
        scores = score_captions(predictions, references, metrics=("bleu", "cider"))
        if len(parts) > 1:
            result.update({f"BLEU-4 {part}": scores["BLEU-4"], f"CIDEr {part}": scores["CIDEr"]})
        result.setdefault("BLEU-4", []).append(scores["BLEU-4"])
        result.setdefault("CIDEr", []).append(scores["CIDEr"])
    result["BLEU-4"], result["CIDEr"] = (sum(result[k]) / len(parts) for k in ("BLEU-4", "CIDEr"))
    return {**result, **caption_stats(texts, ended), "examples": texts[:3]}


def log_epoch(metrics_path: Path, record: dict, val: dict, started: float, improved: bool, note: str = "") -> None:
    """Appends an epoch to metrics.jsonl with its validation scores, redraws the curves, prints a line."""
    per_dataset = {f"val_{k.replace(' ', '_')}": v for k, v in val.items() if k.startswith(("BLEU-4 ", "CIDEr "))}
    record = {**record, "val_BLEU-4": val["BLEU-4"], "val_CIDEr": val["CIDEr"], **per_dataset,
              "val_distinct_words": val["distinct_words"], "val_distinct_captions": val["distinct_captions"],
              "val_cut_mid_phrase": val["cut_mid_phrase"], "elapsed_s": round(time.time() - started, 1)}
    with metrics_path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    plot_curves(metrics_path, metrics_path.parent / "curves.png")
    phase = f"{record['phase']} epoch" if "phase" in record else "epoch"
    trained = (f"loss {record['train_loss']:.3f}" if "train_loss" in record
               else f"reward {record['train_reward']:.3f}")
    parts = "".join(f"  {k.removeprefix('val_')} {v:.2f}" for k, v in per_dataset.items() if k.startswith("val_CIDEr"))
    log(f"{phase} {record['epoch']}: {trained}  val BLEU-4 {val['BLEU-4']:.2f}  CIDEr {val['CIDEr']:.2f}  "
         f"words {val['distinct_words']}{parts}  cut {val['cut_mid_phrase']}  e.g. {val['examples'][0]!r}"
         + ("  (best)" if improved else "") + note)


def save_phase_best(best_dir: Path, encoder: Encoder, decoder, vocab: Vocabulary, saved: dict, phase: str,
                    epoch: int, cider: float, started: float) -> None:
    """Replaces best/ from a phase after the first: phase 1's summary, the new validation CIDEr, and
    which epoch of which phase it came from."""
    training = dict(saved["training"], val_CIDEr=round(cider, 2),
                    **{f"{phase}_epoch": epoch, f"{phase}_seconds": round(time.time() - started, 1)})
    save_checkpoint(best_dir, encoder=encoder, decoder=decoder, vocab=vocab, transform=encoder.transform,
                    training=training)


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    epochs = [r["epoch"] for r in rows]
    flows = [f for r in rows for f in r.get("grad_flow", [])]
    fig, (left, right, *gradients) = plt.subplots(1, 3 if flows else 2, figsize=(15 if flows else 10, 4))
    if flows:
        plot_grad_flow(gradients[0], flows)
    supervised = [r for r in rows if "train_loss" in r]
    left.plot([r["epoch"] for r in supervised], [r["train_loss"] for r in supervised], marker="o")
    left.set(title="training loss", xlabel="epoch")
    rewarded = [r for r in rows if "train_reward" in r]
    if rewarded:
        right_axis = left.twinx()
        right_axis.plot([r["epoch"] for r in rewarded], [r["train_reward"] for r in rewarded], marker="s",
                        color="tab:green")
        right_axis.set_ylabel("self-critical reward (CIDEr-D of samples)")
    right.plot(epochs, [r["val_CIDEr"] for r in rows], marker="o", label="val CIDEr")
    right.plot(epochs, [r["val_BLEU-4"] for r in rows], marker="o", label="val BLEU-4")
    right.set(title="validation (greedy)", xlabel="epoch")
    right.legend()
    fig.tight_layout()
    atomic_file(png_path, lambda tmp: fig.savefig(tmp, dpi=80), suffix=".tmp.png")
    plt.close(fig)


def plot_grad_flow(axis, records: list[dict]) -> None:
    """|dL/dh_t| (solid), the last word's loss alone at h_t, |dl_T/dh_t| (dashed), and for the LSTM
    along its cell state, |dl_T/dc_t| (dotted), against t (log scale) at the start, middle and end of
    training (grad_flow.py; older records have only the solid line)."""
    picked = {"start": records[0], "middle": records[len(records) // 2], "end": records[-1]}
    for (name, record), color in zip(picked.items(), ("tab:blue", "tab:orange", "tab:green")):
        values = record["dL_dh"]
        axis.plot(range(1, len(values) + 1), values, marker=".", color=color, label=f"{name} (step {record['step']})")
        for key, style in (("dlT_dh", "--"), ("dlT_dc", ":")):
            if key in record:
                last_word = record[key][:-1] if key == "dlT_dc" else record[key]  # c_T's is 0: the loss reads h_T
                axis.plot(range(1, len(last_word) + 1), last_word, linestyle=style, color=color)
    axis.set(title="through time (dashed: last word's loss at h_t; dotted: at the LSTM's c_t)",
             xlabel="word position t", ylabel="|dL/dh_t|, |dl_T/dh_t|, |dl_T/dc_t|", yscale="log")
    axis.legend()


def plot_grad_flow_records(records: list[dict], png_path: Path) -> None:
    """The gradient panel alone, from records kept in a checkpoint's config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    plot_grad_flow(axis, records)
    fig.tight_layout()
    atomic_file(png_path, lambda tmp: fig.savefig(tmp, dpi=80), suffix=".tmp.png")
    plt.close(fig)
