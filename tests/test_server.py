"""The JSON HTTP API (`captioner serve`) on a real server on 127.0.0.1: captions equal to the Python
API's, every bad input its own 4xx, HTTP Basic auth, dynamic batching, and Ray Serve."""

import concurrent.futures
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from conftest import bomb, load_bench

free_port = load_bench("soak_app").free_port
USER = ("ann", "s3cret")


def start_server(*args: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc.log_path = log.name
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"captioner serve exited early:\n{Path(log.name).read_text()}")
        try:
            if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"captioner serve did not answer within {timeout} s:\n{Path(log.name).read_text()}")


def stop_server(proc: subprocess.Popen) -> str:
    """Interrupts it as Ctrl-C does (Ray shuts its local cluster down then) -> its log."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = Path(proc.log_path).read_text()
    Path(proc.log_path).unlink(missing_ok=True)
    return text


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    """The model as the server loads it (the session's tiny_captioner may be set to other precisions by
    other tests)."""
    from captioner import Captioner

    return Captioner.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    proc, url = start_server("--checkpoint", str(tiny_checkpoint), "--auth", ":".join(USER), "--max-images", "4",
                             "--max-upload-mb", "1", "--max-wait-ms", "100")
    yield url
    log = stop_server(proc)
    assert "Traceback" not in log, log


def post(url: str, files: list, auth=USER, **options) -> httpx.Response:
    """files: paths, or (name, bytes) pairs, sent in the field `images`; options as form fields."""
    parts = [("images", (f.name, f.read_bytes()) if isinstance(f, Path) else f) for f in files]
    return httpx.post(url + "/v1/captions", files=parts, data={k: str(v) for k, v in options.items()}, auth=auth,
                      timeout=60)


def texts(image: dict) -> list[str]:
    return [c["text"] for c in image["captions"]]


@pytest.mark.parametrize("method, options", [("greedy", {}), ("beam", {"beam_size": 2}),
                                             ("sample", {"num_samples": 2, "seed": 5, "temperature": 1.5})])
def test_each_method_gives_the_python_api_captions(server, served, scene_paths, method, options):
    answer = post(server, scene_paths[:2], method=method, **options)
    assert answer.status_code == 200, answer.text
    expected = served.generate(scene_paths[:2], method, **options)
    for got, want in zip(answer.json()["images"], expected):
        assert texts(got) == [c.text for c in want.captions]
        assert [c["logprob"] for c in got["captions"]] == pytest.approx([c.logprob for c in want.captions], abs=1e-3)
    assert answer.json()["method"] == method


def test_several_images_with_labels_and_options_as_query_parameters(server, served, scene_paths):
    answer = httpx.post(server + "/v1/captions?labels=3&max_length=12", auth=USER, timeout=60,
                        files=[("images", (p.name, p.read_bytes())) for p in scene_paths])
    assert answer.status_code == 200, answer.text
    images = answer.json()["images"]
    assert [i["file"] for i in images] == [p.name for p in scene_paths]
    assert [i["caption"] for i in images] == served.caption(scene_paths, max_length=12)
    for image, labels in zip(images, served.labels(scene_paths, k=3)):
        assert [x["name"] for x in image["labels"]] == [x.name for x in labels]


def test_bad_inputs_get_their_own_4xx_and_the_server_keeps_answering(server, scene_paths, tmp_path):
    jpeg = scene_paths[0].read_bytes()
    bomb(tmp_path / "bomb.png")
    cases = {
        "truncated": (415, [("cut.jpg", jpeg[: len(jpeg) // 3])], {}),
        "not an image": (415, [("notes.jpg", b"these are not pixels")], {}),
        "empty upload": (422, [("empty.jpg", b"")], {}),
        "pixel bomb": (413, [tmp_path / "bomb.png"], {}),
        "file over the upload limit": (413, [("huge.jpg", os.urandom(1_200_000))], {}),
        "too many images": (422, [scene_paths[0]] * 5, {}),
        "a bad option": (422, [scene_paths[0]], {"beam_size": 0}),
        "an unknown option": (422, [scene_paths[0]], {"beams": 3}),
    }
    for case, (status, files, options) in cases.items():
        answer = post(server, files, **options)
        assert answer.status_code == status, (case, answer.text)
        error = answer.json()["error"]
        assert error and "Traceback" not in answer.text, case
    answer = httpx.post(server + "/v1/captions", files={"method": (None, "greedy")}, auth=USER, timeout=60)
    assert answer.status_code == 422 and "no image" in answer.json()["error"]
    assert "beam_size" in post(server, [scene_paths[0]], beam_size=0).json()["error"]  # names the field
    assert "'notes.jpg'" in post(server, [("notes.jpg", b"text")]).json()["error"]  # and the file
    # a body over the whole request's limit (4 images of 1 MB), refused before it is read
    answer = httpx.post(server + "/v1/captions", auth=USER, timeout=60,
                        files=[("images", ("big.jpg", os.urandom(6 * 2**20)))])
    assert answer.status_code == 413, answer.text
    answer = httpx.post(server + "/v1/captions", auth=USER, json={"images": []}, timeout=60)
    assert answer.status_code == 415 and "multipart/form-data" in answer.json()["error"]
    # one bad image among good ones: the good ones are captioned, the bad one says why
    answer = post(server, [scene_paths[0], ("notes.jpg", b"text")])
    assert answer.status_code == 200
    good, bad = answer.json()["images"]
    assert good["caption"] == "A red circle on a white background."
    assert bad["status"] == 415 and "notes.jpg" in bad["error"]


def test_credentials_are_required_except_for_health(server, scene_paths):
    for auth in (None, ("ann", "wrong"), ("bob", "s3cret")):
        answer = post(server, [scene_paths[0]], auth=auth)
        assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(server + "/v1/model", auth=auth, timeout=10).status_code == 401
    assert httpx.get(server + "/v1/health", timeout=10).json() == {"status": "ok"}
    model = httpx.get(server + "/v1/model", auth=USER, timeout=10).json()
    assert model["vocabulary"] > 0 and model["batching"]["max_batch"] == 32
    assert "/v1/captions" in httpx.get(server + "/openapi.json", timeout=10).json()["paths"]


def test_concurrent_requests_share_model_calls_and_keep_their_captions(server, served, scene_paths):
    def counts() -> dict:
        return httpx.get(server + "/v1/model", auth=USER, timeout=10).json()["served"]

    jobs = [(scene_paths[i % 4], "greedy", {}) for i in range(12)] + \
           [(scene_paths[i % 4], "sample", {"seed": i, "num_samples": 2}) for i in range(8)]
    before = counts()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: post(server, [job[0]], method=job[1], **job[2]), jobs))
    after = counts()
    assert after["requests"] - before["requests"] == len(jobs)
    calls = after["model_calls"] - before["model_calls"]
    assert calls < len(jobs), calls  # batched: fewer model calls than requests
    for (path, method, options), answer in zip(jobs, answers):
        [want] = served.generate([path], method, **options)
        assert texts(answer.json()["images"][0]) == [c.text for c in want.captions], (method, options)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None,
                    reason="Ray Serve is in the optional extra captioner[ray], not installed")
def test_ray_serve_deployment_gives_the_single_process_captions(tiny_checkpoint, served, scene_paths):
    proc, url = start_server("--checkpoint", str(tiny_checkpoint), "--ray", "--replicas", "1", timeout=240)
    try:
        answer = post(url, scene_paths, auth=None, method="beam", beam_size=2)
        assert answer.status_code == 200, answer.text
        assert [i["caption"] for i in answer.json()["images"]] == served.caption(scene_paths, method="beam",
                                                                                          beam_size=2)
        assert post(url, [("notes.jpg", b"text")], auth=None).status_code == 415
        assert httpx.get(url + "/v1/model", timeout=10).json()["batching"]["ray"] is True
    except BaseException:
        print(stop_server(proc)[-5000:])  # the server's side of it, in pytest's report
        raise
    stop_server(proc)
