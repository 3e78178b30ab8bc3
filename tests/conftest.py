import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def pytest_collection_modifyitems(config, items):
    # Tests marked root need BPF and namespaces. CI runs as root; a skipped test is never
    # counted as passing, so without root they fail (in the root_only fixture) instead.
    for item in items:
        if item.get_closest_marker("root"):
            item.fixturenames.insert(0, "root_only")


@pytest.fixture(scope="session")
def root_only():
    assert os.geteuid() == 0, "these tests need root (BPF, network namespaces)"
