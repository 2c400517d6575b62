"""The model can learn: overfit a handful of synthetic pairs, and it really uses the condition."""

import torch

from blip3o_denoise.data.synthetic import SyntheticSpec, SyntheticWorld
from blip3o_denoise.evaluate import token_metrics
from blip3o_denoise.flow import FlowConfig, flow_loss, sample_path
from blip3o_denoise.model import ModelConfig, UniversalDiT
from blip3o_denoise.sampling import generate
from blip3o_denoise.sphere import normalize


def test_overfit_twenty_pairs_and_condition_is_used():
    torch.manual_seed(0)
    spec = SyntheticSpec(num_samples=20, eva_dim=32, clip_dim=16, tokens=16)
    clip, eva, _ = SyntheticWorld(spec).sample(20, torch.Generator().manual_seed(0))
    target, cond = normalize(clip), normalize(eva)
    model = UniversalDiT(ModelConfig(input_dim=16, cond_dim=32, hidden_size=64, depth=2, num_heads=4, num_kv_heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=True)
    flow = FlowConfig(min_noise_level=0.0, max_noise_level=1.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(600):
        path = sample_path(target, flow, gen)
        loss, _ = flow_loss(model(path.x_t, path.t, cond), path, flow)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = generate(model, cond, "velocity", num_steps=20, generator=torch.Generator().manual_seed(2))
    right = token_metrics(out, target)["cosine_mean"]
    wrong = token_metrics(generate(model, cond.roll(1, 0), "velocity", num_steps=20,
                                   generator=torch.Generator().manual_seed(2)), target)["cosine_mean"]
    assert right > 0.9, right
    assert wrong < right - 0.3, (right, wrong)
