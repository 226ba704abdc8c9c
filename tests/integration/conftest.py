import pytest
from hardened_server import start_hardened_server


@pytest.fixture(scope="session")
def hardened_server(tiny_llama, tmp_path_factory):
    """One server for test_fuzz.py and test_hardening.py."""
    server = start_hardened_server(tiny_llama, tmp_path_factory.mktemp("hardened") / "server.log")
    yield server
    server.stop()
