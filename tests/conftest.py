import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: extra threads only add overhead (and spin on a shared machine).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests parametrised over a model family skip, with the reason, the families
    the installed transformers cannot build (the dependency-floors CI job)."""
    from attrlab.testing import FAMILIES, family_skip_reason

    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for value in params.values():
            if isinstance(value, str) and value in FAMILIES:
                reason = family_skip_reason(value)
                if reason is not None:
                    item.add_marker(pytest.mark.skip(reason=reason))
