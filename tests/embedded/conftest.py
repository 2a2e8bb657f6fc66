import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These tests decode on one thread (steadier on a shared 2-core box); other tests keep their setting."""
    yield
