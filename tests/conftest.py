import pytest
import torch

from captioning.data import find_flickr8k


@pytest.fixture(scope="session")
def flickr8k_root():
    "The real Flickr8k folder, or skip: set CAPTIONING_FLICKR8K or put it at ../shared/data/flickr8k."
    root = find_flickr8k()
    if root is None:
        pytest.skip("real Flickr8k not found: set CAPTIONING_FLICKR8K or place it at ../shared/data/flickr8k")
    return root


@pytest.fixture
def one_thread():
    "Tiny models run faster on one thread than two, and the tests share the machine (modules opt in with `pytestmark`)."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
