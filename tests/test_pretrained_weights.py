"""torchvision's ImageNet weights for the resnet50 and mobilenet_v2 encoders, loaded through torchvision's own code from a
torch hub cache built here (random weights under the file name torchvision downloads), with the network cut off."""
import pickle
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import pytest
import torch
import torchvision

from captioning.encoder import PretrainedWeightsUnavailable, build_encoder

ARCHITECTURES = {"resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
                 "mobilenet_v2": (torchvision.models.mobilenet_v2, torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2)}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    "An empty TORCH_HOME that torch.hub reads, and no network: a download attempt raises as it does offline."
    def no_network(*args, **kwargs): raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # what torch.hub.set_dir sets; unset, get_dir reads TORCH_HOME
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch"


def checkpoint_path(torch_home: Path, weights) -> Path:
    "Where torchvision looks for `weights` before downloading: the URL's file name under $TORCH_HOME/hub/checkpoints."
    return torch_home / "hub" / "checkpoints" / Path(urlparse(weights.url).path).name


def random_state_dict(name: str, seed: int) -> dict:
    "A randomly initialised network's state, BatchNorm statistics randomised too, so that every tensor is checkable."
    torch.manual_seed(seed)
    model = ARCHITECTURES[name][0]()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def assert_same_state(got: dict, expected: dict):
    assert list(got) == list(expected)
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the checkpoint, e.g. {different[:3]}"


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_pretrained_weights_load_from_the_torch_hub_cache(torch_home, name):
    weights = ARCHITECTURES[name][1]
    path = checkpoint_path(torch_home, weights)
    assert path.name == {"resnet50": "resnet50-11ad3fa6.pth", "mobilenet_v2": "mobilenet_v2-7ebf99e0.pth"}[name]
    path.parent.mkdir(parents=True)
    state = random_state_dict(name, seed=1)
    torch.save(state, path)
    encoder = build_encoder(name, pretrained=True)
    assert_same_state(encoder.model.state_dict(), state)
    # not what the constructor draws anyway: a second random network differs in its first convolution
    first = next(k for k in state if k.endswith("weight"))
    assert not torch.equal(build_encoder(name, pretrained=False).model.state_dict()[first], state[first])
    assert not any(p.requires_grad for p in encoder.parameters())  # trainable_blocks=0: frozen as built


def test_missing_weights_offline_say_what_to_do_and_doing_it_works(torch_home):
    "mobilenet_v2 (tests/test_encoder.py covers resnet50's message): the advice names the file and the folder."
    weights = ARCHITECTURES["mobilenet_v2"][1]
    path = checkpoint_path(torch_home, weights)
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        build_encoder("mobilenet_v2", pretrained=True)
    message = str(error.value)
    assert str(weights) in message and weights.url in message and "name resolution" in message
    assert "build_encoder('efficientnet_lite0')" in message and "pretrained=False" in message
    assert f"copy the file {path.name} into {path.parent}" in message
    assert isinstance(error.value.__cause__, URLError)
    assert not path.exists()  # the failed download left no partial file for the next run to read
    # follow the advice: the file in that folder is what the next build loads
    state = random_state_dict("mobilenet_v2", seed=2)
    torch.save(state, path)
    assert_same_state(build_encoder("mobilenet_v2", pretrained=True).model.state_dict(), state)


def test_a_cached_file_that_is_not_a_checkpoint_is_reported(torch_home):
    path = checkpoint_path(torch_home, ARCHITECTURES["mobilenet_v2"][1])
    path.parent.mkdir(parents=True)
    path.write_text("<html><body>403 Forbidden</body></html>")
    with pytest.raises(PretrainedWeightsUnavailable, match="mobilenet_v2"):
        build_encoder("mobilenet_v2", pretrained=True)
