import contextlib
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


@contextlib.contextmanager
def moto_s3_server():
    """moto's S3 server on 127.0.0.1 (a real S3 API over HTTP); yields its endpoint URL.

    moto keeps buckets in process-wide memory, shared by every server in this process, so the state is
    reset when a server starts and when it stops: one test module's objects never leak into another's.
    """
    import requests
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    requests.post(f"{endpoint}/moto-api/reset", timeout=30).raise_for_status()
    try:
        yield endpoint
    finally:
        requests.post(f"{endpoint}/moto-api/reset", timeout=30)
        server.stop()
