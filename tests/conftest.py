import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # families.py and reference.py

torch.set_num_threads(1)  # results compared bit-for-bit-ish; one thread also keeps the shared CI machine calm


@pytest.fixture(scope="session")
def tokenizer():
    from safety_heads.tiny import byte_tokenizer

    return byte_tokenizer()
