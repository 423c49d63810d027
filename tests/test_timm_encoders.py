"""timm encoders (ViT, CLIP image towers, timm CNNs) built offline with random weights at small sizes: shapes, the
preprocessing read from the model's pretrained config, feature cache keys, weights from local files and the hub's
cache, one-line errors without a network, freezing, and an export round trip."""
import dataclasses
import time

import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")
import huggingface_hub  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

from captioning import encoder as encoder_module  # noqa: E402
from captioning.data import ImagePreprocessing, image_transforms  # noqa: E402
from captioning.encoder import (PretrainedWeightsUnavailable, TimmEncoder, build_encoder,  # noqa: E402
                                extract_features, feature_cache_key, timm_encoder_name,
                                timm_model_spec, timm_preprocessing)
from captioning.synthetic import synthetic_corpus  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = "timm:vit_tiny_patch16_224"  # ViT-Ti/16: 192 wide, 12 blocks
CLIP_MODEL = "vit_base_patch32_clip_quickgelu_224.openai"  # OpenAI's CLIP ViT-B/32 image tower, as timm names it
SMALL_CLIP = timm_encoder_name(CLIP_MODEL, depth=2, embed_dim=64, num_heads=2)  # its config, 2 layers 64 wide
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def vit():
    return build_encoder(VIT, pretrained=False, image_size=64).eval()  # a 4x4 grid of patches


@pytest.fixture(scope="module")
def small_clip():
    return build_encoder(SMALL_CLIP, pretrained=False).eval()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    "No network (the quick connection test fails) and an empty Hugging Face cache; any download attempt fails the test."
    monkeypatch.setattr(encoder_module, "hub_unreachable_reason", lambda timeout=3.0: "cannot connect to huggingface.co (test)")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    def no_download(*args, **kwargs): raise AssertionError("tried to download")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_download)
    return tmp_path / "hub"


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_names_carry_the_model_and_its_arguments():
    assert SMALL_CLIP == f"timm:{CLIP_MODEL}(depth=2,embed_dim=64,num_heads=2)"
    assert timm_model_spec(SMALL_CLIP) == (CLIP_MODEL, {"depth": 2, "embed_dim": 64, "num_heads": 2})
    assert timm_model_spec("timm:resnet18") == ("resnet18", {})
    model_name, kwargs = timm_model_spec("timm:m(b=(1, 2), a='x')")
    assert timm_encoder_name(model_name, **kwargs) == "timm:m(a='x',b=(1, 2))"  # sorted: one name per model
    for bad in ("timm:m(depth=2", "timm:m(2)", "timm:m(depth=two)", "timm:m(**k)", "timm:hf-hub:timm/m"):
        with pytest.raises(ValueError): timm_model_spec(bad)


def test_unknown_models_and_arguments_are_value_errors():
    with pytest.raises(ValueError, match="unknown timm model"): build_encoder("timm:no_such_model", pretrained=False)
    with pytest.raises(ValueError, match="Invalid pretrained tag"): build_encoder("timm:vit_tiny_patch16_224.nope", pretrained=False)
    with pytest.raises(ValueError, match="no_such_argument"):
        build_encoder("timm:vit_tiny_patch16_224(no_such_argument=1)", pretrained=False)
    with pytest.raises(ValueError, match="timm:<model name>"): build_encoder("vgg16")  # the error names the timm form
    with pytest.raises(ValueError, match="weights_file"): build_encoder("efficientnet_lite0", weights_file="x.pth")


def test_vit_patch_tokens_are_the_regions_and_the_class_token_the_global_vector(vit):
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        tokens = vit.model.forward_features(images)  # (2, 1 + 16, 192)
        g, r = vit(images)
    assert tokens.shape == (2, 17, 192) and vit.model.num_prefix_tokens == 1
    assert g.shape == (2, 192) and r.shape == (2, vit.num_regions, vit.feature_dim) == (2, 16, 192)
    assert torch.equal(g, tokens[:, 0]) and torch.equal(r, tokens[:, 1:])
    assert torch.isfinite(g).all() and torch.isfinite(r).all()


def test_vit_runs_at_any_size_with_the_same_weights():
    encoder = build_encoder(VIT, pretrained=False).eval()
    shapes = {}
    for size in (224, 96):
        encoder.preprocessing = build_encoder(VIT, pretrained=False, image_size=size).preprocessing
        with torch.inference_mode(): shapes[size] = encoder(torch.randn(1, 3, size, size))[1].shape
        assert shapes[size] == (1, encoder.num_regions, 192)
    assert shapes == {224: (1, 196, 192), 96: (1, 36, 192)}


def test_clip_tower_features_and_preprocessing_from_its_config(small_clip):
    p = small_clip.preprocessing
    assert (p.size, p.resize, p.mean, p.std, p.squash) == (224, 248, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, False)
    assert p.interpolation == "bicubic"
    with torch.inference_mode():
        g, r = small_clip(torch.randn(2, 3, 224, 224))
    assert g.shape == (2, 64) and r.shape == (2, 49, 64) == (2, small_clip.num_regions, small_clip.feature_dim)
    config = timm.data.resolve_model_data_config(small_clip.model)  # the source of truth, read back independently
    assert (config["mean"], config["std"], config["interpolation"]) == (p.mean, p.std, "bicubic")


@pytest.mark.parametrize("model_name, crop_pct, expected_resize", [("vit_small_patch16_224", 0.9, 248),
                                                                   ("vit_base_patch16_clip_224.laion2b", 1.0, None)])
def test_timm_preprocessing_follows_timm_eval_transform(model_name, crop_pct, expected_resize):
    config = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(model_name).to_dict())
    assert config["crop_pct"] == crop_pct
    p = timm_preprocessing(config)
    assert isinstance(p, ImagePreprocessing) and p.resize == expected_resize and p.interpolation == "bicubic"
    # our evaluation transform crops the same pixels as timm's own
    image = Image.new("RGB", (320, 240))
    image.paste((200, 30, 30), (100, 60, 220, 180))
    ours = image_transforms(TimmEncoder(model_name, depth=1).preprocessing)(image)
    theirs = timm.data.create_transform(**config)(image)
    assert ours.shape == theirs.shape == (3, 224, 224) and torch.allclose(ours, theirs, atol=1e-5)
    squashed = timm_preprocessing({**config, "crop_mode": "squash"})
    assert squashed.squash and squashed.resize is None
    with pytest.raises(ValueError, match="crop mode"): timm_preprocessing({**config, "crop_mode": "border"})


def test_timm_cnn_gives_its_feature_map_as_regions():
    encoder = build_encoder("timm:resnet18", pretrained=False, image_size=64).eval()
    with torch.inference_mode(): g, r = encoder(torch.randn(2, 3, 64, 64))
    assert not encoder.tokens and encoder.reduction == 32 and encoder.feature_dim == 512
    assert g.shape == (2, 512) and r.shape == (2, encoder.num_regions, 512) == (2, 4, 512)
    assert torch.allclose(g, r.mean(1), atol=1e-5)
    assert encoder.preprocessing.mean == (0.485, 0.456, 0.406) and encoder.preprocessing.interpolation == "bicubic"


def test_interpolation_reaches_the_transforms_and_the_cache_key(vit):
    for train in (False, True):
        assert image_transforms(vit.preprocessing, train=train).transforms[0].interpolation == InterpolationMode.BICUBIC
    lite = build_encoder("efficientnet_lite0", pretrained=False)
    assert image_transforms(lite.preprocessing).transforms[0].interpolation == InterpolationMode.BILINEAR
    key = feature_cache_key(vit, ["a", "b"], False, "float16")
    assert key["encoder"] == VIT and key["preprocessing"]["interpolation"] == "bicubic"
    assert key["preprocessing"]["size"] == 64 and key["preprocessing"]["mean"] == (0.5, 0.5, 0.5)
    assert "interpolation" not in feature_cache_key(lite, ["a", "b"], False, "float16")["preprocessing"]
    bicubic = vit.preprocessing
    vit.preprocessing = dataclasses.replace(bicubic, interpolation="bilinear")
    try: assert feature_cache_key(vit, ["a", "b"], False, "float16")["key"] != key["key"]
    finally: vit.preprocessing = bicubic


def test_feature_cache_of_a_timm_encoder(tmp_path, vit, small_clip):
    images = synthetic_corpus(n_train=5, n_dev=0, n_test=0)["train"]
    store = extract_features(vit, images, tmp_path, batch_size=2, bf16=False, verbose=False)
    assert store.global_features.shape == (5, 192) and store.region_features.shape == (5, 16, 192)
    assert store.meta["preprocessing"]["interpolation"] == "bicubic" and store.meta["encoder"] == VIT
    pixels = torch.stack([image_transforms(vit.preprocessing)(item.load()) for item in images])  # bicubic, as extracted
    with torch.inference_mode(): g, r = vit(pixels)
    cached_g, cached_r = store[list(range(5))]
    assert torch.allclose(cached_g, g, atol=1e-5) and torch.allclose(cached_r, r, rtol=2 ** -10, atol=1e-4)
    assert extract_features(vit, images, tmp_path, bf16=False, verbose=False).path == store.path  # reused
    clip_store = extract_features(small_clip, images[:2], tmp_path, bf16=False, verbose=False)
    assert clip_store.path.name.startswith("timm-vit_base_patch32_clip_quickgelu_224.openai-depth-2-embed_dim-64-num_heads-2-")
    assert clip_store.region_features.shape == (2, 49, 64)


def test_freezing_counts_timm_parameter_groups_and_never_trains_the_classifier():
    encoder = build_encoder(VIT, pretrained=False, image_size=64, trainable_blocks=2).train()
    assert len(encoder.blocks) == 13  # the patch embedding with class token and positions, then 12 blocks
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.blocks.10.", "model.blocks.11.", "model.norm.")) for n in trainable)
    assert "model.norm.weight" in trainable  # the final norm goes with the last block
    g, r = encoder(torch.randn(2, 3, 64, 64))
    (g.sum() + r.sum()).backward()
    assert all((p.grad is not None) == p.requires_grad for p in encoder.parameters())  # every trainable one learns
    encoder.unfreeze()
    assert {n for n, p in encoder.named_parameters() if not p.requires_grad} == {"model.head.weight", "model.head.bias"}
    assert not any(p.requires_grad for p in encoder.freeze().parameters())


def test_weights_load_from_a_local_file(tmp_path, offline):
    donor = build_encoder(SMALL_CLIP, pretrained=False)
    save_file(donor.model.state_dict(), tmp_path / "clip.safetensors")
    torch.save(donor.model.state_dict(), tmp_path / "clip.pth")
    for file in ("clip.safetensors", "clip.pth"):
        encoder = build_encoder(SMALL_CLIP, weights_file=tmp_path / file)
        assert same_state(encoder, donor) and not any(p.requires_grad for p in encoder.parameters())
    assert not same_state(build_encoder(SMALL_CLIP, pretrained=False), donor)  # not what the constructor draws anyway


def test_weights_in_the_hugging_face_cache_load_without_a_network(offline):
    donor = build_encoder(VIT, pretrained=False)
    snapshot = offline / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    save_file(donor.model.state_dict(), snapshot / "model.safetensors")
    assert same_state(build_encoder(VIT), donor)
    (snapshot / "model.safetensors").write_text("<html>Service Unavailable</html>")  # a damaged download
    with pytest.raises(PretrainedWeightsUnavailable) as error: build_encoder(VIT)
    message = str(error.value)
    assert str(snapshot / "model.safetensors") in message and "Hugging Face cache" in message and "delete it" in message


def test_offline_without_weights_is_one_quick_line_with_the_alternatives(offline, small_clip):
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable) as error: small_clip.load_pretrained()
    assert time.perf_counter() - start < 2
    message = str(error.value)
    assert "\n" not in message and SMALL_CLIP in message and "cannot connect to huggingface.co" in message
    for alternative in ("weights_file=", "build_encoder('efficientnet_lite0')", "pretrained=False"):
        assert alternative in message


def test_a_file_that_is_not_the_models_weights_names_the_file(tmp_path):
    save_file(build_encoder(VIT, pretrained=False).model.state_dict(), tmp_path / "vit_tiny.safetensors")
    (tmp_path / "page.pth").write_text("<html><body>403 Forbidden</body></html>")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("vit_tiny.safetensors", "page.pth", "empty.safetensors", "missing.pth"):
        with pytest.raises(PretrainedWeightsUnavailable) as error: build_encoder(SMALL_CLIP, weights_file=tmp_path / name)
        assert str(tmp_path / name) in str(error.value) and "\n" not in str(error.value)


def test_export_round_trip_captions_identically(tmp_path):
    from captioning.decoder import DecoderConfig, build_decoder
    from captioning.model import CaptionModel
    from captioning.vocabulary import Vocabulary

    torch.manual_seed(0)
    encoder = build_encoder(SMALL_CLIP, pretrained=False, image_size=96)  # a 3x3 grid of 32-pixel patches
    vocab = Vocabulary.build(["a red circle on a blue square", "a green triangle"], min_freq=1)
    decoder = build_decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=encoder.feature_dim, kind="attention",
                                          embed_dim=16, hidden_dim=32, attention_dim=16))
    with torch.no_grad(): decoder.output.bias[vocab.stoi["circle"]] += 5.0  # so that the captions are not empty
    model = CaptionModel(encoder, decoder, vocab).eval()
    model.save_pretrained(tmp_path / "export")
    loaded = CaptionModel.from_pretrained(tmp_path / "export")
    assert loaded.encoder.name == SMALL_CLIP and isinstance(loaded.encoder, TimmEncoder)
    assert loaded.encoder.preprocessing == encoder.preprocessing and loaded.encoder.preprocessing.size == 96
    assert loaded.encoder.preprocessing.interpolation == "bicubic" and same_state(loaded, model)
    images = [Image.new("RGB", (120, 90), colour) for colour in ("red", "navy", "white")]
    captions = model.caption(images, beam_size=2)
    assert loaded.caption(images, beam_size=2) == captions and all("circle" in c for c in captions)
