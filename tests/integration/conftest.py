import pytest
from hardened_server import start_hardened_server


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster than two fighting over a busy machine's cores (a
    module takes it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hardened_server(tiny_llama, tmp_path_factory):
    """One server for test_fuzz.py and test_hardening.py."""
    server = start_hardened_server(tiny_llama, tmp_path_factory.mktemp("hardened") / "server.log")
    yield server
    server.stop()
