import pytest


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(shared_compilation_cache):
  """main.py runs here repeat the same tiny shapes: they share compiled programs (tests/conftest.py)."""
