"""The JSON API against the gradio_client path, on one server, side by side.

    python bench/soak_http.py [--dataset ../shared/data/flickr8k] [--seconds 20] [--concurrency 1,8,32]
                              [--soak-seconds 300] [--ray]

Starts `app.py` (the web UI and the JSON API on one port) with the built-in model, then for greedy and
beam 3 and each concurrency keeps that many callers busy for `seconds`, one image a request: first
through `POST /v1/captions` (one httpx client a caller), then through gradio_client's `/caption`
(one Client a caller). Every answer is checked against the caption the same image got alone, first,
so a caption that changed with the batch it joined counts as wrong. Prints requests a second,
p50/p95 latency and the ratio of the two paths; then `--soak-seconds` of the JSON API at the middle
concurrency, greedy, with the server's memory each minute. `--ray` also runs the JSON API on Ray
Serve with 2 replicas (`captioner serve --ray --replicas 2`) at the middle concurrency, greedy.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_app import free_port, rss_mb, start_app, stop_app  # noqa: E402

METHODS = {"greedy": ({"method": "greedy"}, "Argmax (greedy)"), "beam 3": ({"method": "beam", "beam_size": 3},
                                                                           "Beam search")}


def json_caller(url: str, options: dict):
    client = httpx.Client(timeout=120)

    def call(path: Path) -> str:
        answer = client.post(url + "v1/captions", files=[("images", (path.name, path.read_bytes()))],
                             data={k: str(v) for k, v in options.items()})
        answer.raise_for_status()
        return answer.json()["images"][0]["caption"]
    return call


def gradio_caller(url: str, method: str):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)

    def call(path: Path) -> str:
        return client.predict(handle_file(str(path)), method, 1.0, 0, 1.0, 1, 0, 3, 0.0, 20, api_name="/caption")[0]
    return call


def run(make_caller, images: list[Path], concurrency: int, seconds: float, expected: dict) -> dict:
    """`concurrency` threads, each with its own caller, for `seconds` -> requests/s, p50, p95, wrong."""
    latencies, wrong, lock = [], [], threading.Lock()
    callers = [make_caller() for _ in range(concurrency)]
    start = time.perf_counter()
    stop = start + seconds

    def worker(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            path = images[i % len(images)]
            t0 = time.perf_counter()
            try:
                text = callers[k](path)
            except Exception as err:  # counted, shown below
                text = f"{type(err).__name__}: {err}"
            with lock:
                latencies.append(time.perf_counter() - t0)
                if path in expected and text != expected[path]:
                    wrong.append((path.name, text, expected[path]))
            i += concurrency

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = sorted(1000 * s for s in latencies)
    return {"rps": len(ms) / elapsed, "p50": statistics.median(ms), "p95": ms[int(0.95 * (len(ms) - 1))],
            "n": len(ms), "wrong": wrong}


def line(name: str, r: dict) -> str:
    return (f"  {name:<16} {r['rps']:7.1f} req/s  p50 {r['p50']:6.0f} ms  p95 {r['p95']:6.0f} ms  "
            f"({r['n']} requests, {len(r['wrong'])} wrong)")


def start_ray_server(replicas: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="serve-ray-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--ray", "--replicas", str(replicas),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "v1/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"Ray Serve did not start:\n{Path(log.name).read_text()[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/flickr8k", help="its test photos are the requests")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--soak-seconds", type=float, default=300)
    parser.add_argument("--ray", action="store_true")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    middle = concurrencies[len(concurrencies) // 2]
    names = (Path(args.dataset) / "test.txt").read_text().split()[: args.images]
    images = [Path(args.dataset) / "images" / n for n in names]

    proc, url = start_app()
    print(f"app.py pid {proc.pid}, {len(images)} Flickr8k test photos, {os.cpu_count()} CPUs; "
          f"server memory at start {rss_mb(proc.pid):.0f} MB")
    try:
        for label, (options, gradio_method) in METHODS.items():
            alone = json_caller(url, options)
            expected = {p: alone(p) for p in images}  # each image captioned alone, one request at a time
            print(f"{label}:")
            for c in concurrencies:
                api = run(lambda: json_caller(url, options), images, c, args.seconds, expected)
                ui = run(lambda: gradio_caller(url, gradio_method), images, c, args.seconds, expected)
                print(line(f"JSON API, c={c}", api))
                print(line(f"gradio_client, c={c}", ui))
                print(f"  JSON / gradio_client: {api['rps'] / ui['rps']:.1f}x the requests a second")
                for wrong in (api["wrong"] + ui["wrong"])[:3]:
                    print("    wrong:", wrong)
        if args.soak_seconds:
            memory = [rss_mb(proc.pid)]
            expected = {p: json_caller(url, {"method": "greedy"})(p) for p in images}
            total = {"n": 0, "wrong": 0}
            for _ in range(max(1, round(args.soak_seconds / 60))):
                r = run(lambda: json_caller(url, {"method": "greedy"}), images, middle, min(60, args.soak_seconds),
                        expected)
                total["n"] += r["n"]
                total["wrong"] += len(r["wrong"])
                memory.append(rss_mb(proc.pid))
            print(f"soak: {total['n']} JSON requests in {args.soak_seconds:.0f} s at c={middle}, greedy, "
                  f"{total['wrong']} wrong; server memory each minute: {', '.join(f'{m:.0f}' for m in memory)} MB")
    finally:
        stop_app(proc)

    if args.ray:
        ray_proc, ray_url = start_ray_server(2)
        try:
            alone = json_caller(ray_url, {"method": "greedy"})
            expected = {p: alone(p) for p in images}
            r = run(lambda: json_caller(ray_url, {"method": "greedy"}), images, middle, args.seconds, expected)
            print("Ray Serve, 2 replicas, greedy:")
            print(line(f"JSON API, c={middle}", r))
        finally:
            os.killpg(ray_proc.pid, signal.SIGINT)
            ray_proc.wait(120)


if __name__ == "__main__":
    main()
