"""Load on the web app: concurrent gradio_client requests, mixed methods, a few corrupt uploads.

    python bench/soak_app.py [--seconds 300] [--concurrency 8] [--checkpoint DIR]

Starts `app.py` on a free local port (or uses --url), keeps `concurrency` clients busy for
`seconds`, checks every answer (a caption for a good image, an error for a corrupt one), and
prints latency p50/p95 and the server's memory before and after. The test suite runs a short
version of the same loop (tests/test_app_load.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    ("Argmax (greedy)", {}),
    ("Sample", {"temperature": 1.0, "num_samples": 2}),
    ("Beam search", {"beam_size": 3}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(*args: str, threads: str = "2") -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    # The server's log goes to a file: an unread pipe fills up (64 KB of error logs) and blocks the server.
    log = tempfile.NamedTemporaryFile("w+", prefix="app-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    proc.log_path = log.name
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited early:\n{Path(log.name).read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("app.py did not start within 120 s")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    Path(proc.log_path).unlink(missing_ok=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(url: str, image: Path, method: str, options: dict, expect_error: bool) -> tuple[float, bool, str]:
    """-> (seconds, answered as expected, what came back)."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_samples": 3, "seed": 0, "beam_size": 3,
                "length_penalty": 0.0, "max_length": 20, **options}
    start = time.perf_counter()
    try:
        text, *_ = client.predict(handle_file(str(image)), method, settings["temperature"], settings["top_k"],
                                 settings["top_p"], settings["num_samples"], settings["seed"], settings["beam_size"],
                                 settings["length_penalty"], settings["max_length"], api_name="/caption")
        ok = (not expect_error) and bool(text)
        seen = text
    except Exception as err:  # the app's error for a bad upload
        ok = expect_error and "not a readable image" in str(err)
        seen = f"{type(err).__name__}: {err}"
    return time.perf_counter() - start, ok, seen


def workload(good: list[Path], bad: list[Path], count: int):
    """`count` requests cycling through methods and images, every eighth one a corrupt upload."""
    for i in range(count):
        method, options = METHODS[i % len(METHODS)]
        if i % 8 == 7 and bad:
            yield bad[i % len(bad)], method, options, True
        else:
            yield good[i % len(good)], method, options, False


def hammer(url: str, good: list[Path], bad: list[Path], requests: int, concurrency: int) -> list[tuple]:
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one_request, url, img, method, opts, err)
                   for img, method, opts, err in workload(good, bad, requests)]
        return [f.result() for f in futures]


def make_corrupt(folder: Path) -> list[Path]:
    (folder / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 64)
    (folder / "text.jpg").write_text("not an image")
    return [folder / "truncated.jpg", folder / "text.jpg"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--url", default=None, help="an app already running (else one is started)")
    args = parser.parse_args()

    import gradio

    good = sorted((Path(gradio.__file__).parent / "media_assets" / "images").glob("*.jpg"))
    proc = None
    url = args.url
    if url is None:
        proc, url = start_app(*(["--checkpoint", args.checkpoint] if args.checkpoint else []))
    with tempfile.TemporaryDirectory() as tmp:
        bad = make_corrupt(Path(tmp))
        rss_before = rss_mb(proc.pid) if proc else float("nan")
        results, start = [], time.time()
        rss_each_minute, next_sample = [], start + 60
        while time.time() < start + args.seconds:
            results += hammer(url, good, bad, args.concurrency * 4, args.concurrency)
            if proc and time.time() >= next_sample:  # does the memory level off?
                rss_each_minute.append(round(rss_mb(proc.pid)))
                next_sample += 60
        rss_after = rss_mb(proc.pid) if proc else float("nan")
    if proc:
        stop_app(proc)
    latencies = [1000 * s for s, _, _ in results]
    failures = [seen for _, ok, seen in results if not ok]
    print(f"{len(results)} requests in {args.seconds:.0f} s at concurrency {args.concurrency}: "
          f"{len(failures)} wrong answers")
    print(f"latency p50 {statistics.median(latencies):.0f} ms, p95 {statistics.quantiles(latencies, n=20)[-1]:.0f} ms")
    print(f"server memory {rss_before:.0f} MB before, {rss_after:.0f} MB after; "
          f"after each minute: {', '.join(map(str, rss_each_minute))} MB")
    for seen in failures[:5]:
        print("  wrong:", seen)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
