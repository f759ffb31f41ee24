"""The web UI: upload an image, pick argmax, sampling or beam search, get captions, and see why:
each word coloured by its probability, and selecting a word shows the photo regions behind it.

    python app.py [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASSWORD]

Runs offline on the built-in model by default, reachable from this machine only. Named API
endpoints (`/caption`, `/explain`, `/caption_batch`) serve `gradio_client` too, and the JSON API
(`POST /v1/captions`, captioner/server.py) answers on the same port; see the README.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no request leaves the machine

import gradio as gr
from PIL import Image

from captioner import Captioner
from captioner.data.images import load_image
from captioner.grounding.concepts import FUNCTION_WORDS
from captioner.inference.engines import BACKENDS
from captioner.inference.explain import overlay
from captioner.model.checkpoint import test_reports
from captioner.training.validation import plot_curves, plot_grad_flow_records
from captioner.pipeline import BUILTIN
from captioner.server import MAX_UPLOAD_MB, read_credentials, serve_local

METHODS = {"Argmax (greedy)": "greedy", "Sample": "sample", "Beam search": "beam"}
GROUNDING = {"Full: keep out what is not there, bring in what surely is": "full",
             "Avoid: keep out what is not there": "avoid", "Off": "off"}
MAX_UPLOAD = f"{MAX_UPLOAD_MB}mb"
SESSIONS_KEPT = 500
LABELS_SHOWN = 5
UPLOADS_KEPT_S = 3600  # uploaded files are deleted from gradio's cache after an hour
EXAMPLES_DIR = Path(gr.__file__).parent / "media_assets" / "images"  # photos the gradio package ships
log = logging.getLogger("captioner.app")
EXAMPLES = [EXAMPLES_DIR / name for name in ("cheetah1.jpg", "lion.jpg", "bus.png", "tower.jpg")]


class ImageUpload(gr.Image):
    """gr.Image that hands an uploaded file to our own loader untouched, so the app accepts and refuses
    exactly what the API and the CLI do (pixel limit, draft mode, every mode, EXIF rotation): gr.Image
    would decode the whole upload first to convert it to RGB, clipping 16-bit images and decoding
    bombs under Pillow's own limit. (`is_template` makes gradio render it with the Image frontend.)"""

    is_template = True

    def preprocess(self, payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        return super().preprocess(payload)


def user_error(message: str) -> gr.Error:
    """An error the user caused (a bad upload, a missing image): one line in the server log, not a
    traceback per request, which under a stream of bad uploads would drown the log."""
    log.warning("request refused: %s", message)
    return gr.Error(message, print_exception=False)


def decoding_options(method: str, temperature, top_k, top_p, num_samples, seed, beam_size, length_penalty,
                     max_length) -> tuple[str, dict]:
    if method not in METHODS:
        raise user_error(f"Unknown decoding method {method!r}; choose one of {', '.join(METHODS)}.")
    name = METHODS[method]
    options = {"max_length": int(max_length)}
    if name == "sample":
        options.update(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                       num_samples=int(num_samples), seed=int(seed))
    elif name == "beam":
        options.update(beam_size=int(beam_size), length_penalty=float(length_penalty))
    return name, options


def word_details(word: dict) -> str:
    others = ", ".join(f"{w} ({p:.0%})" for w, p in word["alternatives"])
    if word.get("decoder_word"):
        return (f"**{word['word']}**: what the encoder recognises; the decoder wrote \"{word['decoder_word']}\", "
                f"probability {word['probability']:.0%}; weighed instead: {others}")
    return f"**{word['word']}**: probability {word['probability']:.0%}; weighed instead: {others}"


def evidence_note(grounded, plain) -> str:
    """What the image's evidence changed: the objects it brought into the caption, and the words of
    the caption decoded without it that it kept out."""
    kept = [w for w in dict.fromkeys(plain.words) if w not in grounded.words and w not in FUNCTION_WORDS]
    parts = []
    if grounded.required:
        parts.append("**Brought in** by what the encoder's classifier surely sees: " + ", ".join(grounded.required))
    if kept:
        parts.append("**Kept out** (the caption without grounding says them: \"" + plain.text + "\"): " + ", ".join(kept))
    return "\n\n".join(parts) or "The image's evidence did not change this caption."


def label_scores(labels) -> dict[str, float]:
    """gr.Label's value: "ImageNet class (everyday word)" -> probability."""
    return {(label.name if label.word == label.name.lower() else f"{label.name} ({label.word})"): label.probability
            for label in labels or []}


def model_card(config: dict, parameters: int) -> str:
    encoder, decoder, training = config.get("encoder", {}), config.get("decoder", {}), config.get("training", {})
    lines = [
        "### Loaded model",
        f"- **Encoder:** `{encoder.get('name')}` with weights `{encoder.get('weights')}` "
        f"({encoder.get('feature_dim')}-d features, fine-tuned blocks: {encoder.get('fine_tuned_blocks', 0)})",
        f"- **Decoder:** {decoder.get('cell', 'lstm').upper()}, {decoder.get('num_layers')} layer(s), hidden "
        f"{decoder.get('hidden_dim')}, embedding {decoder.get('embed_dim')}, image fed into the "
        f"{decoder.get('image_feed')}; {parameters:,} parameters",
        f"- **Vocabulary:** {config.get('vocab_size', 0):,} words",
        f"- **Image transform:** `{json.dumps(config.get('transform'))}`",
    ]
    if training:
        lines.append(f"- **Trained on:** {training.get('dataset', 'unknown')} "
                     f"({training.get('train_images', '?')} training images, best epoch {training.get('best_epoch', '?')})")
        for name, report in test_reports(training).items():
            scores = ", ".join(f"{k} {v:.1f}" for k, v in {**report.get("scores", {}),
                                                          **report.get("hallucination", {})}.items()
                               if isinstance(v, float))
            lines.append(f"- **Test scores{' on ' + name if name else ''}** ({report.get('method')}, "
                         f"{report.get('options')}): {scores}")
    return "\n".join(lines)


def training_curves(config: dict, checkpoint: str | None) -> str | None:
    """A PNG of the checkpoint's training curves: its run's whole metrics log where the checkpoint
    still sits in its run directory (RUN/best), else the gradient records kept in its config; None
    when it has neither (a checkpoint trained before gradients were recorded)."""
    metrics = Path(checkpoint).parent / "metrics.jsonl" if checkpoint else None
    png = Path(tempfile.mkdtemp(prefix="captioner-curves-")) / "curves.png"
    if metrics is not None and metrics.is_file():
        plot_curves(metrics, png)
        return str(png)
    flows = config.get("training", {}).get("grad_flow")
    if not flows:
        return None
    plot_grad_flow_records(flows, png)
    return str(png)


def build_app(captioner: Captioner, checkpoint: str | None = None) -> gr.Blocks:
    def caption(image, method, temperature, top_k, top_p, num_samples, seed, beam_size, length_penalty, max_length,
                grounding="Full: keep out what is not there, bring in what surely is"):
        if image is None:
            raise user_error("Upload an image first.")
        if grounding not in GROUNDING:
            raise user_error(f"Unknown grounding {grounding!r}; choose one of {', '.join(GROUNDING)}.")
        name, options = decoding_options(method, temperature, top_k, top_p, num_samples, seed, beam_size,
                                         length_penalty, max_length)
        labels = LABELS_SHOWN if captioner.encoder.classifier is not None else 0
        [result] = captioner.generate([image], name, labels=labels, grounding=GROUNDING[grounding], **options)
        if result.error:
            raise user_error(result.error.replace(str(image), Path(image).name))  # never show the server's path
        rows = [[rank, c.text, round(c.logprob, 3), round(c.perplexity, 2)]
                for rank, c in enumerate(result.captions, 1)]
        note = ""
        if GROUNDING[grounding] != "off":
            [plain] = captioner.generate([image], name, grounding="off", **options)
            note = evidence_note(result.captions[0], plain.captions[0])
        return result.captions[0].text, rows, label_scores(result.labels), note

    def explain_caption(image, text):
        """Teacher-forces the caption shown (the top beam, or the first sample) through the model."""
        if image is None or not text:
            raise user_error("Caption an image first.")
        explanation = captioner.explain(image, caption=text)
        photo = load_image(image)
        folder = Path(tempfile.mkdtemp(prefix="explain-"))
        overlays = []
        for i, word in enumerate(explanation.words):
            path = folder / f"{i:02d}.png"
            overlay(photo, word.heatmap).save(path)
            overlays.append(str(path))
        details = explanation.to_dict()
        words = [(w["word"] + " ", w["probability"]) for w in details["words"]]
        return words, overlays[0], word_details(details["words"][0]), details, overlays

    def select_word(overlays, details, evt: gr.SelectData):
        if not overlays:
            raise user_error("Caption an image first.")
        return overlays[evt.index], word_details(details["words"][evt.index])

    def caption_batch(files, method, beam_size):
        if not files:
            raise user_error("Add one or more image files first.")
        name, options = decoding_options(method, 1.0, 0, 1.0, 1, 0, beam_size, 0.0, 20)
        paths = [f if isinstance(f, str) else f.name for f in files]
        rows = []
        for path, result in zip(paths, captioner.generate(paths, name, seed=0, **options)):
            error = result.error.replace(path, Path(path).name) if result.error else ""
            rows.append([Path(path).name, result.text or "", error])
        out = Path(tempfile.mkdtemp(prefix="captions-")) / "captions.csv"
        with out.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "caption", "error"])
            writer.writerows(rows)
        return rows, str(out)

    def show_controls(method):
        return gr.update(visible=method == "Sample"), gr.update(visible=method == "Beam search")

    with gr.Blocks(title="captioner", delete_cache=(UPLOADS_KEPT_S // 4, UPLOADS_KEPT_S)) as demo:
        gr.Markdown("# captioner\nA CNN encoder feeds an LSTM decoder through W_ih. Upload a photo and caption it.")
        with gr.Tab("Caption"):
            with gr.Row():
                with gr.Column():
                    image = ImageUpload(type="filepath", sources=["upload", "clipboard", "webcam"], label="Image",
                                     elem_id="image-input")
                    method = gr.Radio(list(METHODS), value="Beam search", label="Decoding", elem_id="method")
                    with gr.Group(visible=False) as sample_controls:
                        temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
                        top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k (0: off)")
                        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                        num_samples = gr.Slider(1, 5, value=3, step=1, label="Number of samples")
                        seed = gr.Number(value=0, precision=0, label="Seed")
                    with gr.Group(visible=True) as beam_controls:
                        beam_size = gr.Slider(1, 10, value=3, step=1, label="Beam size")
                        length_penalty = gr.Slider(-1.0, 2.0, value=0.0, step=0.1, label="Length penalty α")
                    max_length = gr.Slider(5, 40, value=20, step=1, label="Max length (tokens)")
                    grounding = gr.Radio(list(GROUNDING), value=next(iter(GROUNDING)), elem_id="grounding",
                                         label="Grounding: what the image's evidence does to the caption")
                    button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                with gr.Column():
                    best = gr.Textbox(label="Caption", elem_id="caption-output", interactive=False)
                    table = gr.Dataframe(headers=["rank", "caption", "log-prob", "perplexity"],
                                         label="All captions (beams ranked, or each sample)", interactive=False,
                                         elem_id="caption-table", wrap=True,
                                         column_widths=["12%", "52%", "18%", "18%"])
                    seen = gr.Label(num_top_classes=LABELS_SHOWN, label="What the encoder sees (ImageNet classes)",
                                    elem_id="labels-output")
                    evidence = gr.Markdown(elem_id="evidence-output")
            with gr.Row():
                with gr.Column():
                    words = gr.HighlightedText(label="Why: each word by its probability (select a word)",
                                               elem_id="explained-words", show_legend=False, combine_adjacent=False)
                    chosen = gr.Markdown(elem_id="word-details")
                with gr.Column():
                    heat = gr.Image(label="Where the selected word looked", interactive=False, elem_id="word-overlay")
            details = gr.JSON(visible=False)
            overlays = gr.State([])
            gr.Examples([[str(p)] for p in EXAMPLES if p.is_file()], inputs=[image], label="Examples")
            method.change(show_controls, method, [sample_controls, beam_controls], api_name=False)
            button.click(caption, [image, method, temperature, top_k, top_p, num_samples, seed, beam_size,
                                   length_penalty, max_length, grounding], [best, table, seen, evidence],
                         api_name="caption").then(
                # gradio's default ("once") drops an explain requested while the last is still running,
                # leaving the words of an earlier caption under a new one; run the latest instead
                explain_caption, [image, best], [words, heat, chosen, details, overlays], api_name="explain",
                trigger_mode="always_last")
            words.select(select_word, [overlays, details], [heat, chosen], api_name=False)
        with gr.Tab("Batch"):
            files = gr.File(file_count="multiple", label="Images", elem_id="batch-files")
            with gr.Row():
                batch_method = gr.Radio(["Argmax (greedy)", "Beam search"], value="Beam search", label="Decoding")
                batch_beam = gr.Slider(1, 10, value=3, step=1, label="Beam size")
            run = gr.Button("Caption all", variant="primary")
            batch_table = gr.Dataframe(headers=["file", "caption", "error"], interactive=False)
            batch_csv = gr.File(label="CSV")
            run.click(caption_batch, [files, batch_method, batch_beam], [batch_table, batch_csv],
                      api_name="caption_batch")
        with gr.Tab("Model"):
            gr.Markdown(model_card(captioner.config, sum(p.numel() for p in captioner.decoder.parameters())),
                        elem_id="model-card")
            curves = training_curves(captioner.config, checkpoint)
            if curves:
                gr.Image(curves, label="Training: loss, dev scores, and |dL/dh_t| through time (log scale)",
                         interactive=False, elem_id="model-curves")
            else:
                gr.Markdown("This checkpoint predates the gradient record: its training kept no |dL/dh_t| "
                            "(`grad_flow_every`), so there is no gradient panel to show.", elem_id="model-curves")
    # Captioning is CPU-bound: one request at a time per worker keeps latency predictable.
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--auth", action="append", metavar="USER:PASSWORD",
                        help="require a login (repeat for more users); use it whenever --host or --share "
                             "lets others reach the server")
    parser.add_argument("--auth-file", default=None, help="USER:PASSWORD lines, for passwords kept off the command line")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="where the encoder runs; auto: the fastest installed (OpenVINO, ONNX Runtime, PyTorch)")
    parser.add_argument("--max-batch", type=int, default=32, help="the JSON API's most images in one model call")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long the JSON API's first request waits for others to batch with")
    args = parser.parse_args(argv)
    try:
        auth = read_credentials(args.auth, args.auth_file)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    captioner = Captioner.from_pretrained(args.checkpoint, backend=args.backend)  # shared by every request
    captioner.caption(Image.new("RGB", (64, 64)))  # builds the encoder's engine before the first visitor
    demo = build_app(captioner, args.checkpoint)
    # Gradio keeps per-session state for its last 10,000 sessions by default, ~90 KB each here: the
    # server grew by 45 MB a minute under load (bench/README.md). Nothing here needs old sessions.
    demo.state_session_capacity = SESSIONS_KEPT
    if args.share:  # a gradio.live link reaches gradio's own server: the UI and gradio_client, no /v1 API
        demo.launch(server_name=args.host, server_port=args.port, share=True, auth=auth, max_file_size=MAX_UPLOAD,
                    show_error=True, state_session_capacity=SESSIONS_KEPT)
        return
    print(f"web UI on http://{args.host}:{args.port}/, JSON API on http://{args.host}:{args.port}/v1/captions",
          flush=True)
    serve_local(captioner, args.checkpoint or BUILTIN, args.host, args.port, max_batch=args.max_batch,
                max_wait_ms=args.max_wait_ms, credentials=auth, max_upload_mb=MAX_UPLOAD_MB,
                wrap=lambda api: gr.mount_gradio_app(api, demo, path="/", auth=auth, max_file_size=MAX_UPLOAD,
                                                     show_error=True))


if __name__ == "__main__":
    main()
