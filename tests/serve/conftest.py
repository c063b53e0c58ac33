"""Fixtures for the serving tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def reference_restorer():
    """The runtime the servers load (tiny, random weights seed 0), in this process, for expected outputs."""
    from supir_rt import Restorer

    with Restorer.tiny_random() as r:
        yield r
