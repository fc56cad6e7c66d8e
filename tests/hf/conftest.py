"""Fixtures for the Hugging Face tests: one torch thread (tiny models; the machine is shared), quiet logs."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add synchronisation overhead under load
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
    transformers.logging.set_verbosity(verbosity)
    torch.set_num_threads(n)
