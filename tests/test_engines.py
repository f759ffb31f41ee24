"""Inference speed-ups that must not change what the model computes: the folded encoder, the
encoder's backends (ONNX Runtime, OpenVINO), the ONNX export, and the decoder's matrix-product step."""

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision

from captioner import Captioner
from captioner.cli import main as cli
from captioner.data.vocab import END, START
from captioner.inference.decoding import beam_search, greedy
from captioner.inference.engines import BACKENDS, installed, resolve_backend
from captioner.inference.folding import SameConv2d, fold_module, fold_trunk
from captioner.inference.onnx_captioner import FILES, SHARED_WEIGHTS, OnnxCaptioner
from captioner.model import decoder as decoder_module
from captioner.model.checkpoint import load_checkpoint
from captioner.model.decoder import CaptionDecoder, DecoderConfig, set_step
from captioner.model.efficientnet_lite import SamePad
from captioner.pipeline import BUILTIN

from conftest import FLICKR8K, needs_flickr8k

ENGINES = [pytest.param(b, marks=pytest.mark.skipif(not installed(b), reason=f"{b} is an optional extra, not installed"))
           for b in ("onnxruntime", "openvino")]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


@pytest.mark.parametrize("size", [(224, 224), (97, 130)])  # even sizes take the widened kernel, odd the plain one
def test_folded_trunk_computes_the_unfolded_features(lite0, size):
    folded = fold_trunk(lite0.trunk)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert torch.allclose(folded(pixels), lite0.trunk(pixels), atol=1e-4, rtol=1e-4)
    kinds = {type(m) for m in folded.modules()}
    assert torch.nn.BatchNorm2d not in kinds and SamePad not in kinds and SameConv2d in kinds
    # the model itself is untouched: training, fine-tuning and saving see the modules as trained
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.trunk.modules())


def test_folding_resnet_blocks_keeps_their_output():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    for module in model.modules():  # batch statistics a trained network would have
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    model.eval()
    folded = fold_module(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_a_checkpoint_saved_after_inference_holds_the_unfolded_weights(tiny_captioner, scene_paths, tmp_path):
    tiny_captioner.caption(scene_paths)  # builds the folded engine and the step weights
    saved = tiny_captioner.save_pretrained(tmp_path / "again")
    encoder, decoder, *_ = load_checkpoint(saved)
    assert encoder.trunk.state_dict().keys() == tiny_captioner.encoder.trunk.state_dict().keys()
    assert decoder.state_dict().keys() == tiny_captioner.decoder.state_dict().keys()


def evidence_decoder(num_layers: int) -> CaptionDecoder:
    torch.manual_seed(num_layers)
    decoder = CaptionDecoder(DecoderConfig(feature_dim=40, vocab_size=30, embed_dim=12, hidden_dim=16,
                                           num_layers=num_layers, labels=8, concepts=5, evidence_weight=0.5))
    decoder.set_evidence_words(torch.tensor([5, 6, 7, 8, 9]), torch.tensor([5, -1, 6, -1, -1, 7, -1, 9]))
    return decoder.eval()


@pytest.mark.parametrize("num_layers", [1, 2])
def test_matrix_product_steps_agree_with_the_fused_sequence(num_layers):
    decoder = evidence_decoder(num_layers)
    features = torch.rand(3, 40)
    captions = torch.tensor([[START, 5, 9, 12, END], [START, 7, 7, END, 0], [START, 20, END, 0, 0]])
    lengths = torch.tensor([5, 4, 3])
    with torch.no_grad():
        sequence = decoder(features, captions, lengths)  # nn.LSTM over the whole caption at once
        state = decoder.start(features, evidence_weight=0)
        for t in range(captions.size(1) - 1):
            logits, state = decoder.step(captions[:, t], state)
            real = t < lengths - 1
            assert torch.allclose(logits[real], sequence[real, t], atol=1e-5)
        set_step(decoder, fold=False)
        unfolded = greedy(decoder, features)
        set_step(decoder, fold=True)
        assert [c[0].tokens for c in greedy(decoder, features)] == [c[0].tokens for c in unfolded]


def test_small_batches_decode_through_the_stacked_product_as_large_ones_do_without(monkeypatch):
    decoder, features = evidence_decoder(1), torch.rand(3, 40)
    with torch.no_grad():
        assert len(decoder.start(features)[0]) == 3  # (h, c, W_hh h): logits and gates in one product
        stacked = greedy(decoder, features), beam_search(decoder, features, beam_size=2)
        monkeypatch.setattr(decoder_module, "STACKED_MAX_ROWS", 2)
        assert len(decoder.start(features)[0]) == 2
        separate = greedy(decoder, features), beam_search(decoder, features, beam_size=2)
    for ours, theirs in zip(stacked, separate):
        assert [[c.tokens for c in per] for per in ours] == [[c.tokens for c in per] for per in theirs]
        assert [c.logprob for per in ours for c in per] == pytest.approx([c.logprob for per in theirs for c in per],
                                                                         abs=1e-5)


def test_step_weights_follow_the_weights_after_an_update():
    decoder = evidence_decoder(1)
    features, tokens = torch.rand(2, 40), torch.tensor([5, 6])
    with torch.no_grad():
        before, _ = decoder.step(tokens, decoder.start(features))
        decoder.lstm.weight_hh_l0.mul_(2)  # as an optimiser step or load_state_dict would, in place
        after, _ = decoder.step(tokens, decoder.start(features))
        set_step(decoder, fold=False)
        reference, _ = decoder.step(tokens, decoder.start(features))
    assert not torch.allclose(before, after) and torch.allclose(after, reference, atol=1e-5)


def test_backend_choice_and_its_errors():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("auto", cpu) in BACKENDS[1:] and installed(resolve_backend("auto", cpu))
    if installed("openvino"):  # the fastest engine here whenever it is installed (bench/README.md)
        assert resolve_backend("auto", cpu) == "openvino"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt", cpu)
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("onnxruntime", torch.device("cuda"))


@pytest.mark.parametrize("backend", ["torch", *ENGINES])
def test_each_backend_gives_the_features_and_captions_of_the_unfolded_encoder(tiny_checkpoint, scene_paths, backend):
    exact = Captioner.from_pretrained(tiny_checkpoint, device="cpu", backend="torch", fold=False, precision="fp32")
    fast = Captioner.from_pretrained(tiny_checkpoint, device="cpu", backend=backend, precision="fp32")
    pixels = torch.stack([exact.transform.load(p) for p in scene_paths])
    assert relative_error(fast.encode(pixels), exact.encode(pixels)) < 1e-3
    assert fast.caption(scene_paths) == exact.caption(scene_paths)
    if backend != "torch":
        with pytest.raises(ValueError, match="exported for 3 x 224 x 224"):
            fast.encode(torch.zeros(1, 3, 96, 96))


def check_onnx_export(checkpoint, out, images, shares_weights: bool):
    """`captioner export --onnx`, then ONNX Runtime alone against PyTorch on the same photos."""
    assert cli(["export", str(checkpoint), str(out), "--onnx"]) == 0
    assert all((out / name).is_file() for name in FILES.values())
    if shares_weights:  # the LSTM weights both decoder graphs run are stored once, beside them
        import onnx

        graphs = [out / FILES["start"], out / FILES["step"]]
        inline = sum(len(onnx.load(str(g)).SerializeToString()) for g in graphs)
        shared = (out / SHARED_WEIGHTS).stat().st_size
        assert shared > 0 and sum(g.stat().st_size for g in graphs) + shared < inline - 0.9 * shared
    else:
        assert not (out / SHARED_WEIGHTS).exists()
    exact = Captioner.from_pretrained(out, device="cpu", backend="torch", fold=False, precision="fp32")
    deployed = OnnxCaptioner(out)
    pixels = torch.stack([exact.transform.load(p) for p in images])
    assert relative_error(torch.from_numpy(deployed.encode(pixels.numpy())), exact.encode(pixels)) < 1e-3
    assert deployed.caption(images) == exact.caption(images)
    # a dynamic batch: one image alone gives the caption it gets in a batch
    assert deployed.caption(images[:1]) == exact.caption(images[:1])
    # what a deployment without PyTorch runs: the same captions where `import torch` fails
    code = ("import json, sys; sys.modules['torch'] = None; "
            "from captioner.inference.onnx_captioner import OnnxCaptioner; "
            "print(json.dumps(OnnxCaptioner(sys.argv[1]).caption(sys.argv[2:])))")
    alone = subprocess.run([sys.executable, "-c", code, str(out), *map(str, images)], capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout) == exact.caption(images)


@pytest.mark.skipif(not installed("onnxruntime"), reason="onnxruntime is an optional extra, not installed")
def test_onnx_export_round_trips_on_generated_scenes(tiny_checkpoint, scene_paths, tmp_path):
    # no image evidence: the start runs no LSTM step, so the graphs share no weights
    check_onnx_export(tiny_checkpoint, tmp_path / "onnx", scene_paths, shares_weights=False)


@pytest.mark.skipif(not installed("onnxruntime"), reason="onnxruntime is an optional extra, not installed")
def test_onnx_captions_name_an_object_once_as_pytorch_does(tiny_checkpoint, scene_paths, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path / "once")
    config = json.loads((tmp_path / "once" / "config.json").read_text())
    config["decoder"]["named_once"] = [["circle", "background"]]  # "a red circle on a white background"
    (tmp_path / "once" / "config.json").write_text(json.dumps(config))
    check_onnx_export(tmp_path / "once", tmp_path / "onnx", scene_paths, shares_weights=False)
    exact = Captioner.from_pretrained(tmp_path / "onnx", device="cpu", backend="torch")
    assert exact.caption(scene_paths[:1]) != exact.caption(scene_paths[:1], grounding="off")


@needs_flickr8k
@pytest.mark.slow
@pytest.mark.skipif(not installed("onnxruntime"), reason="onnxruntime is an optional extra, not installed")
def test_onnx_export_of_the_builtin_model_captions_real_photos_alike(tmp_path):
    names = (FLICKR8K / "test.txt").read_text().split()[:12]
    check_onnx_export(BUILTIN, tmp_path / "onnx", [FLICKR8K / "images" / n for n in names], shares_weights=True)
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["encoder"]["name"] == "efficientnet_lite0"


def test_onnx_captioner_names_what_a_folder_lacks(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.onnx.*captioner export"):
        OnnxCaptioner(tmp_path)


def test_bf16_step_weights_decode_close_to_fp32():
    # what precision="auto" reads where the CPU has native bf16; the rounding, not the speed, is tested
    decoder = evidence_decoder(2)
    features, tokens = torch.rand(3, 40), torch.tensor([5, 6, 7])
    with torch.no_grad():
        exact, _ = decoder.step(tokens, decoder.start(features))
        set_step(decoder, dtype=torch.bfloat16)
        rounded, (state, _, _) = decoder.step(tokens, decoder.start(features))
    assert rounded.dtype == torch.float32 and state[0].dtype == torch.float32
    assert torch.allclose(rounded, exact, atol=0.05) and not torch.equal(rounded, exact)
