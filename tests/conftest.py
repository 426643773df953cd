import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # families.py and reference.py

torch.set_num_threads(1)  # results compared bit-for-bit-ish; one thread also keeps the shared CI machine calm


def pytest_configure(config):
    from devices import TEST_DEVICE

    if TEST_DEVICE != "cpu" and not (TEST_DEVICE.startswith("cuda") and torch.cuda.is_available()):
        raise pytest.UsageError(f"SAFETY_HEADS_TEST_DEVICE={TEST_DEVICE}: choose cpu, or cuda / cuda:N on a machine with a GPU")


@pytest.fixture(scope="session")
def tokenizer():
    from safety_heads.tiny import byte_tokenizer

    return byte_tokenizer()
