"""Checkpoints on the Hugging Face Hub, through `huggingface_hub` itself: its download cache,
revision pinning and offline mode for loading, its `upload_folder` for pushing. What is uploaded is
a checkpoint directory as `save_pretrained` writes it, plus a model card made from its config."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .checkpoint import CheckpointError, read_config, test_reports

# A Hub repository id: "org/name" (letters, digits, '-', '_', '.'), never an existing local path.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_FILES = ("config.json", "vocab.json", "model.safetensors")


def is_repo_id(path: str | Path) -> bool:
    return not Path(path).exists() and bool(REPO_ID.match(str(path)))


def download(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local snapshot of `repo_id` at `revision` (a branch, tag or commit; default main),
    fetched into huggingface_hub's cache unless it is there. Offline (HF_HUB_OFFLINE=1 or no
    network), a cached snapshot loads and a missing one fails naming the repository and the cache."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as err:
        raise ImportError(f"loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub: "
                          "pip install huggingface_hub") from err
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                   allow_patterns=list(CHECKPOINT_FILES), library_name="captioner")
    except LocalEntryNotFoundError as err:
        cache = Path(cache_dir or constants.HF_HUB_CACHE)
        raise CheckpointError(
            f"no local directory {repo_id!r}, and Hub repository {repo_id!r} (revision {revision or 'main'}) is "
            f"not in the Hugging Face cache {cache} and cannot be "
            f"downloaded ({'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'no connection to the Hub'}); "
            f"download it once with network, or pass a local checkpoint directory") from err
    return Path(folder)


def model_card(config: dict, repo_id: str) -> str:
    """README.md for the Hub: what the model is, how to load it, and its test scores from config.json."""
    enc, dec, training = config["encoder"], config["decoder"], config.get("training") or {}
    lines = ["---", "library_name: captioner", "pipeline_tag: image-to-text",
             "tags: [image-captioning, lstm, show-and-tell]", "---", "", f"# {repo_id}", "",
             f"An image captioner: {enc['name']} encoder ({'with' if enc.get('with_labels') else 'without'} its "
             f"ImageNet labels), W_ih into an LSTM decoder (hidden {dec['hidden_dim']}, {dec['num_layers']} "
             f"layer(s), vocabulary {config['vocab_size']}). Trained on {training.get('dataset', 'unknown data')}.",
             "", "```python", "from captioner import Captioner", "",
             f'captioner = Captioner.from_pretrained("{repo_id}")',
             'print(captioner.caption("photo.jpg"))', "```", ""]

    def cell(value) -> str:
        return "" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    tests = test_reports(training)
    if tests:
        lines += ["## Test scores", "", "| test set | method | BLEU-4 | METEOR | CIDEr | CHAIRs | distinct words |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, report in tests.items():
            scores, stats = report.get("scores", {}), report.get("stats", {})
            chair = (report.get("hallucination") or {}).get("CHAIRs")
            method = report.get("method", "")
            if method == "beam":
                method = f"beam {report.get('options', {}).get('beam_size', '')}".strip()
            lines.append(f"| {name or training.get('dataset', 'test')} | {method} | {cell(scores.get('BLEU-4'))} | {cell(scores.get('METEOR'))} | "
                         f"{cell(scores.get('CIDEr'))} | {cell(chair)} | {cell(stats.get('distinct_words'))} |")
        lines.append("")
    return "\n".join(lines)


def hub_folder(checkpoint: str | Path, out: str | Path, repo_id: str) -> Path:
    """The folder `push` uploads: the checkpoint's three files and a generated README.md."""
    checkpoint, out = Path(checkpoint), Path(out)
    config = read_config(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if not (checkpoint / name).is_file():
            raise CheckpointError(f"{checkpoint / name}: missing")
        shutil.copy2(checkpoint / name, out / name)
    (out / "README.md").write_text(model_card(config, repo_id), encoding="utf-8")
    return out


def push(checkpoint: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         token: str | None = None, message: str = "Upload captioner checkpoint") -> str:
    """Uploads `hub_folder(checkpoint)` to `repo_id` (created if missing) -> the commit's URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = hub_folder(checkpoint, Path(tmp) / "upload", repo_id)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision, commit_message=message)
    return str(getattr(info, "commit_url", info))
