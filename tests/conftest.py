"""Shared fixtures. Under pytest-xdist each worker gets one torch thread (2 workers on 2 cores)."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
