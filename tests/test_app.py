"""The web app end to end: a real `app.py` server driven by gradio_client, and by a real browser."""

import csv
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, bomb, draw_scene, load_bench

soak = load_bench("soak_app")
start_app, stop_app = soak.start_app, soak.stop_app
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    proc, url = start_app("--checkpoint", str(tiny_checkpoint))
    yield proc, url
    stop_app(proc)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[1], verbose=False)


def caption(client, path, method="Argmax (greedy)", temperature=1.0, top_k=0, top_p=1.0, num_samples=3, seed=0,
            beam_size=3, length_penalty=0.0, max_length=20):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), method, temperature, top_k, top_p, num_samples, seed, beam_size,
                          length_penalty, max_length, api_name="/caption")


def test_argmax_is_deterministic(client, scene_paths):
    first, table, _, _ = caption(client, scene_paths[0])
    assert first == "A red circle on a white background."
    assert caption(client, scene_paths[0])[0] == first
    assert len(table["data"]) == 1 and table["data"][0][1] == first


def test_the_model_tab_names_the_cell_and_says_there_is_no_gradient_record(server, tiny_captioner):
    page = httpx.get(server[1], timeout=30).text  # the page carries its components' values
    parameters = sum(p.numel() for p in tiny_captioner.decoder.parameters())
    assert "LSTM, 1 layer(s), hidden 64" in page and f"{parameters:,} parameters" in page
    assert "predates the gradient record" in page  # saved without training: no |dL/dh_t| to draw


def test_what_the_encoder_sees_is_beside_the_caption(client, tiny_captioner, scene_paths):
    _, _, seen, _ = caption(client, scene_paths[3])
    expected = tiny_captioner.labels(scene_paths[3], k=5)
    shown = [c["label"] for c in seen["confidences"]]
    assert len(shown) == 5 and shown[0].startswith(expected[0].name)
    assert [c["confidence"] for c in seen["confidences"]] == pytest.approx([x.probability for x in expected], abs=1e-3)


def test_explain_endpoint_gives_each_word_its_probability_and_overlay(client, tiny_captioner, scene_paths):
    from gradio_client import handle_file

    words, heat, details, info = client.predict(handle_file(str(scene_paths[0])), "A red circle on a white background.",
                                                api_name="/explain")
    expected = tiny_captioner.explain(scene_paths[0], caption="A red circle on a white background.")
    assert [w["token"].strip() for w in words] == [w.word for w in expected.words]
    assert [w["class_or_confidence"] for w in words] == pytest.approx([w.probability for w in expected.words], abs=1e-3)
    assert Path(heat).is_file() and "probability" in details
    assert [w["word"] for w in info["words"]] == [w.word for w in expected.words]


def test_sampling_reproduces_with_a_seed_and_varies_across_seeds(client, scene_paths):
    a = [caption(client, p, "Sample", temperature=2.0, seed=1)[1]["data"] for p in scene_paths]
    b = [caption(client, p, "Sample", temperature=2.0, seed=1)[1]["data"] for p in scene_paths]
    c = [caption(client, p, "Sample", temperature=2.0, seed=2)[1]["data"] for p in scene_paths]
    assert a == b
    assert all(len(rows) == 3 for rows in a)
    assert a != c


def test_beam_returns_the_requested_ranked_beams(client, scene_paths):
    best, table, _, _ = caption(client, scene_paths[1], "Beam search", beam_size=5)
    rows = table["data"]
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5] and rows[0][1] == best
    logprobs = [r[2] for r in rows]
    assert logprobs == sorted(logprobs, reverse=True)


def test_a_corrupt_upload_is_an_error_and_the_server_keeps_serving(server, client, scene_paths, tmp_path):
    from gradio_client.exceptions import AppError

    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(AppError, match=r"^corrupt.jpg: not a readable image \([^/]*\)$"):  # no server path
        caption(client, bad)
    assert caption(client, scene_paths[2])[0] == "Green stripes cross a grey field."
    log = Path(server[0].log_path).read_text()
    assert "request refused: corrupt.jpg: not a readable image" in log
    assert "Traceback" not in log  # a user's bad file is one log line, not a stack trace


def test_batch_endpoint_gives_a_row_per_file_and_a_csv(client, scene_paths, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "notes.jpg"
    bad.write_text("a text file named .jpg")
    table, csv_path = client.predict([handle_file(str(p)) for p in (scene_paths[0], bad, scene_paths[3])],
                                     "Argmax (greedy)", 3, api_name="/caption_batch")
    rows = table["data"]
    assert [r[0] for r in rows] == ["red_circle.jpg", "notes.jpg", "yellow_triangle.jpg"]
    assert rows[0][1] == "A red circle on a white background." and rows[0][2] == ""
    assert rows[1][1] == "" and "notes.jpg: not a readable image" in rows[1][2]
    with open(csv_path, newline="") as f:
        assert [r["file"] for r in csv.DictReader(f)] == ["red_circle.jpg", "notes.jpg", "yellow_triangle.jpg"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_real_browser_upload_caption_and_select_a_word(scene_paths):
    """Upload, caption with each method, then select a word of the explained caption: its overlay
    replaces the first word's. The screenshot is the README's."""
    from playwright.sync_api import sync_playwright

    import gradio

    photo = Path(gradio.__file__).parent / "media_assets" / "images" / "cheetah1.jpg"
    proc, url = start_app()  # the built-in model, as `make run` serves it
    ARTIFACTS.mkdir(exist_ok=True)
    captions = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            try:
                page.goto(url)
                page.locator("#image-input input[type=file]").set_input_files(str(photo))
                output = page.locator("#caption-output textarea")
                for method in ("Argmax (greedy)", "Sample", "Beam search"):
                    page.get_by_label(method, exact=True).check()
                    if method == "Sample":
                        page.get_by_text("Temperature").first.wait_for()
                    if method == "Beam search":
                        page.get_by_text("Beam size").first.wait_for()
                    before = output.input_value()
                    page.locator("#caption-button").click()
                    page.wait_for_function(
                        "([sel, old]) => { const t = document.querySelector(sel); "
                        "return t && t.value && t.value !== old; }",
                        arg=["#caption-output textarea", before if method != "Argmax (greedy)" else ""], timeout=60000)
                    captions[method] = output.input_value()
                words = page.locator("#explained-words .token")
                # the explanation follows the caption: wait for this caption's words, not an earlier one's
                page.wait_for_function(
                    "(want) => [...document.querySelectorAll('#explained-words .token')].map(t => t.innerText)"
                    ".join('').replace(/\\s/g, '') === want",
                    arg=captions["Beam search"].lower().replace(" ", "").rstrip("."), timeout=60000)
                shown = page.locator("#word-overlay img")
                shown.wait_for(timeout=60000)
                page.wait_for_function(
                    "() => document.querySelector('#word-details')?.innerText.includes('probability')")
                first_src, first_details = shown.get_attribute("src"), page.locator("#word-details").inner_text()
                words.nth(2).click()
                page.wait_for_function("(old) => document.querySelector('#word-overlay img')?.src !== old",
                                       arg=first_src, timeout=30000)
                selected = page.locator("#word-details").inner_text()
                page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)
            except Exception as err:  # a timeout says little: add what the page and the server show
                explained = page.evaluate("() => [...document.querySelectorAll('#explained-words .token')]"
                                          ".map(t => t.innerText).join(' ')")
                log = Path(proc.log_path).read_text()[-4000:]
                raise AssertionError(f"{type(err).__name__}: {err}\ncaptions: {captions}\nexplained words: "
                                     f"{explained}\napp log (tail):\n{log}") from err
            browser.close()
    finally:
        stop_app(proc)
    assert all(text and text[0].isupper() and text.endswith(".") for text in captions.values()), captions
    assert selected != first_details and "probability" in selected
    assert (ARTIFACTS / "ui.png").stat().st_size > 10_000


def test_auth_refuses_the_page_and_the_api_without_credentials(tiny_checkpoint, scene_paths, tmp_path):
    import urllib.error
    import urllib.request

    from gradio_client import Client

    secrets = tmp_path / "users.txt"
    secrets.write_text("# one user a line\nbob:hunter22\n")
    proc, url = start_app("--checkpoint", str(tiny_checkpoint), "--auth", "ann:s3cret", "--auth-file", str(secrets))
    try:
        # the page is a login form: neither the app's config (its components) nor its API is given out
        for route in ("config", "gradio_api/info"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + route, timeout=10)
            assert refused.value.code == 401, route
        with pytest.raises(Exception):
            Client(url, verbose=False)
        for user in (("ann", "s3cret"), ("bob", "hunter22")):
            client = Client(url, auth=user, verbose=False)
            assert caption(client, scene_paths[0])[0] == "A red circle on a white background."
        with pytest.raises(Exception):
            Client(url, auth=("ann", "wrong"), verbose=False)
        # the JSON API beside the UI asks for the same users' credentials
        image = [("images", (scene_paths[0].name, scene_paths[0].read_bytes()))]
        for auth in (None, ("ann", "wrong")):
            assert httpx.post(url + "v1/captions", files=image, auth=auth, timeout=60).status_code == 401
        answer = httpx.post(url + "v1/captions", files=image, auth=("bob", "hunter22"), timeout=60)
        assert answer.json()["images"][0]["caption"] == "A red circle on a white background."
    finally:
        stop_app(proc)


def test_auth_flags_refuse_a_malformed_pair(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--auth", "nopassword"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "--auth: expected USER:PASSWORD" in result.stderr


def test_the_app_accepts_and_refuses_what_the_api_does(client, tiny_captioner, corpus, tmp_path):
    from gradio_client.exceptions import AppError

    for path in sorted(corpus.iterdir()):  # every mode, animated GIF and WebP, 16-bit
        [expected] = tiny_captioner.generate([path])
        assert caption(client, path)[0] == expected.text, path.name
    bomb(tmp_path / "bomb.png")
    with pytest.raises(AppError, match=r"^bomb.png: refused, too many pixels \(above the limit of [\d,]+;"):
        caption(client, tmp_path / "bomb.png")


def test_exif_rotated_upload_is_captioned_upright(client, tmp_path):
    from PIL import Image

    upright = draw_scene("yellow_triangle", size=160)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.rotate(90, expand=True).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    upright.rotate(90, expand=True).save(tmp_path / "sideways.jpg", quality=95)  # the same pixels, no EXIF
    upright.save(tmp_path / "upright.jpg", quality=95)
    # the caption's log-probability tells the pictures apart even where the words agree
    logprob = {name: caption(client, tmp_path / f"{name}.jpg")[1]["data"][0][2]
               for name in ("upright", "rotated", "sideways")}
    assert abs(logprob["rotated"] - logprob["upright"]) < abs(logprob["sideways"] - logprob["upright"]), logprob


def test_big_photo_is_captioned_and_an_oversized_upload_refused(client, tmp_path):
    import numpy as np
    from PIL import Image

    big = tmp_path / "camera.jpg"
    draw_scene("red_circle", size=96).resize((8000, 6000)).save(big, quality=80)
    assert caption(client, big)[0] == "A red circle on a white background."
    noise = tmp_path / "noise.png"  # incompressible: just over the app's 25 MB upload limit
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 3000, 3), dtype=np.uint8)).save(noise)
    assert noise.stat().st_size > 25_000_000
    with pytest.raises(Exception, match="(?i)exceed|too large|maximum"):
        caption(client, noise)
    assert caption(client, big)[0] == "A red circle on a white background."
