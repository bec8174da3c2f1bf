import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import FIXTURE_DIR  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long runs (benchmarks); CI skips them with -m 'not slow'")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests run tiny models: one intra-op thread is as fast, and does not oversubscribe a shared machine's cores."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def test_tokenizer_path(tmp_path_factory) -> str:
    from tools.build_test_tokenizer import ensure_test_tokenizer
    cache = os.environ.get("GLM_TEST_CACHE") or str(tmp_path_factory.mktemp("tokenizer"))
    return ensure_test_tokenizer(cache)


@pytest.fixture(scope="session")
def test_tokenizer(test_tokenizer_path):
    from model.tokenizer import IceTokenizer
    return IceTokenizer(test_tokenizer_path)


@pytest.fixture(scope="session")
def demo_dir() -> str:
    """The embedded demo model (built once, shared with scripts through GLM_DEMO_DIR / demo_cache)."""
    from tools.create_demo import ensure_demo
    return ensure_demo(os.environ.get("GLM_DEMO_DIR") or str(ROOT / "demo_cache"))
