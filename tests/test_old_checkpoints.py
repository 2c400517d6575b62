"""A run saved before flow maps (and any later model option) loads and samples bit-identically.

tests/fixtures/run_before_flow_maps was written by the code of commit e828918: a micro model
(hidden 32, one block) trained for 4 steps, with the samples it gave then in expected.safetensors.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file

from blip3o_denoise.pipeline import Denoiser

RUN = Path(__file__).parent / "fixtures" / "run_before_flow_maps"


def test_a_run_from_before_flow_maps_samples_exactly_as_it_did():
    den = Denoiser.from_pretrained(RUN)
    want = load_file(str(RUN / "expected.safetensors"))
    assert torch.equal(den.generate(want["condition"], num_steps=3, seed=1), want["generated"])
    assert torch.equal(den.denoise(want["noisy"], want["condition"], 0.5, num_steps=3), want["denoised"])
    assert not any("step" in name for name in den.model.state_dict())  # no parameters it never had
