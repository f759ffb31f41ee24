"""32 concurrent requests with mixed methods and corrupt uploads: every answer right, server healthy."""

import statistics

from conftest import load_bench

soak = load_bench("soak_app")


def test_32_concurrent_requests(tiny_checkpoint, scene_paths, tmp_path):
    proc, url = soak.start_app("--checkpoint", str(tiny_checkpoint))
    try:
        bad = soak.make_corrupt(tmp_path)
        soak.hammer(url, scene_paths, [], 3, 3)  # warm-up
        before = soak.rss_mb(proc.pid)
        results = soak.hammer(url, scene_paths, bad, 32, 32)
        after = soak.rss_mb(proc.pid)
        assert proc.poll() is None, "the server died"
    finally:
        soak.stop_app(proc)
    wrong = [seen for _, ok, seen in results if not ok]
    assert not wrong, wrong[:3]
    assert sum(1 for _, _, seen in results if "not a readable image" in seen) == 4
    assert after - before < 300, f"server memory grew from {before:.0f} MB to {after:.0f} MB"
    latencies = sorted(1000 * s for s, _, _ in results)
    print(f"32 concurrent: p50 {statistics.median(latencies):.0f} ms, p95 {latencies[int(0.95 * 31)]:.0f} ms")
