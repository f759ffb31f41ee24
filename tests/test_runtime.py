"""Mixed precision and the allocator setting (captioner/model/runtime.py): real models, real processes."""

import subprocess
import sys

import pytest
import torch

from captioner import Captioner
from captioner.model.runtime import autocast_dtype, native_cpu_bf16
from captioner.training.features import cache_key


def test_precision_choice():
    assert autocast_dtype("cpu", "fp32") is None
    assert autocast_dtype("cpu", "auto") == (torch.bfloat16 if native_cpu_bf16() else None)
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("cpu", "fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        Captioner(None, None, None, None, device="cpu", precision="half")


def test_auto_precision_keeps_the_features_and_the_captions(tiny_checkpoint, scene_paths):
    exact = Captioner.from_pretrained(tiny_checkpoint, device="cpu", precision="fp32")
    fast = Captioner.from_pretrained(tiny_checkpoint, device="cpu", precision="auto")
    pixels = torch.stack([exact.transform.load(p) for p in scene_paths])
    cosine = torch.nn.functional.cosine_similarity(exact.encode(pixels), fast.encode(pixels))
    assert cosine.min() > 0.995  # 0.998 on these flat drawings, 0.9996 on Flickr8k photos
    assert fast.caption(scene_paths) == exact.caption(scene_paths)


@pytest.mark.skipif(not native_cpu_bf16(), reason="this CPU has no native bf16: auto is fp32 here")
def test_features_of_another_precision_are_cached_apart(lite0, scene_paths):
    assert cache_key(lite0, scene_paths, False, torch.device("cpu"), "auto") != \
        cache_key(lite0, scene_paths, False, torch.device("cpu"), "fp32")


# As the command line runs it: main() tunes the allocator, then the command loads the model (the
# package itself loads it lazily, so a bare `import captioner` no longer lays out the heap alike).
PAGE_FAULTS = """
import resource, sys, torch
import captioner.cli
from captioner.model.runtime import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
import captioner.pipeline
for _ in range(3):  # warm-up
    torch.ones(16_000_000).mul_(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # 64 MB allocated, touched and freed, like one activation of a forward pass
    torch.ones(16_000_000).mul_(2)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_stops_refaulting_big_blocks():
    faults = {mode: int(subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "tuned")}
    assert faults["default"] > 20 * 10_000  # each 64 MB block faulted in again: ~16k pages
    # Tuned, the freed blocks are reused. About one run in four the heap still grows once (a small
    # allocation lands above the freed block), which faults one block's pages in, once.
    assert faults["tuned"] < 2 * 16_384, faults
