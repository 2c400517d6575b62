import os

import pytest
import torch

# This machine is shared: two threads of PyTorch slow down by up to 10x when another process is
# busy. One thread keeps test times predictable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
