import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # The test models and tensors are tiny: measured on the shared 2-core box, two intra-op
    # threads made the digits UNet 20× slower (3.3 s vs 0.17 s) and the exact GMM's softmax up to
    # 100× slower (spin-waiting), so every test runs torch on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def gmm():
    """The shipped `--model gmm` (exact mixture). Modules that need another mixture define their own."""
    from fewstep.runtime.models import load

    return load("gmm")


@pytest.fixture(scope="session")
def digits():
    """The shipped digits teacher as `--model digits` loads it."""
    from fewstep.runtime.models import load

    return load("digits")
