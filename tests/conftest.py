"""Suite-wide fixtures."""
import pytest
import torch

_THREADS_AT_START = torch.get_num_threads()  # conftest is imported before any test module


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test may pin torch to one thread (e.g. for a deterministic reduction); the next test must not inherit it.
    Tests that compare a subprocess with this process bit for bit rely on both using the same thread count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_collection_finish(session):
    """Fail fast if importing a test module changed torch's thread count (a module-level set_num_threads)."""
    if torch.get_num_threads() != _THREADS_AT_START:
        raise pytest.UsageError(f"a test module changed torch's thread count at import "
                                f"({_THREADS_AT_START} -> {torch.get_num_threads()}); set it inside a test instead")
