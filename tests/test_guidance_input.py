"""Guidance as a model input (--distill_guidance_scales): one flow map, the guidance scale chosen at sampling
time, one call per jump."""

from contextlib import nullcontext

import pytest
import torch

from blip3o_denoise import sphere as S
from blip3o_denoise.config import TrainConfig
from blip3o_denoise.data.noise import NoiseCollate
from blip3o_denoise.flow import FlowConfig
from blip3o_denoise.model import UniversalDiT, config_from_preset

FULL = {"min_noise_level": 0.0, "max_noise_level": 1.0}


def _dit(guidance_input=True, seed=0):
    torch.manual_seed(seed)
    m = UniversalDiT(config_from_preset("micro", 8, 12, hidden_size=32, depth=1, num_heads=2, num_kv_heads=1,
                                        flow_map=True, guidance_input=guidance_input, cond_dropout=0.2)).eval()
    with torch.no_grad():  # as if trained: the output layer, the AdaLN gates and new embeddings start at zero
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def test_scale_one_is_the_model_without_the_input_and_other_scales_change_it():
    m, x, c = _dit(), S.normalize(torch.randn(3, 4, 8)), torch.randn(3, 4, 12)
    t, d = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.5, 0.25, 0.125])
    with torch.no_grad():
        plain = m(x, t, c, step_size=d)
        assert torch.equal(m(x, t, c, step_size=d, guidance=torch.ones(3)), plain)
        assert not torch.allclose(m(x, t, c, step_size=d, guidance=torch.full((3,), 2.0)), plain, atol=1e-4)
    old = _dit(guidance_input=False)
    with torch.no_grad():
        assert torch.equal(old(x, t, c, guidance=torch.ones(3)), old(x, t, c))
    with pytest.raises(ValueError, match="no guidance scale as input"):
        old(x, t, c, guidance=torch.full((3,), 2.0))


def test_the_loader_draws_a_scale_per_jump_sample_from_its_seed():
    collate = NoiseCollate(FlowConfig(**FULL), seed=3, flow_map_share=0.5, flow_map_min_step=0.25,
                           guidance_scales=(1.0, 2.0, 3.0))
    items = [{"target": torch.randn(4, 8), "condition": torch.randn(4, 12), "index": i} for i in range(64)]
    a, b = collate(items), collate(items[::-1])
    jumps = a["step"] > 0
    assert set(a["guidance"][jumps].tolist()) == {1.0, 2.0, 3.0} and set(a["guidance"][~jumps].tolist()) == {1.0}
    assert torch.equal(a["guidance"], b["guidance"].flip(0))  # a sample's scale depends on its seed alone


def test_targets_follow_each_samples_guided_teacher(tmp_path):
    from blip3o_denoise.cli import main
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
    from blip3o_denoise.flow import path_from
    from blip3o_denoise.flowmap import teacher_target
    from blip3o_denoise.pipeline import Denoiser
    from blip3o_denoise.sampling import model_velocity_fn
    from blip3o_denoise.train import build, flow_map_targets

    data, teacher_dir = tmp_path / "d", tmp_path / "teacher"
    make_synthetic(data, SyntheticSpec(num_samples=40, eva_dim=16, clip_dim=8, tokens=16))
    small = ["--chunked_embeddings_dir", str(data), "--model_size", "micro", "--batch_size", "8", "--max_steps", "3",
             "--warmup_steps", "1", "--eval_every_n_steps", "0", "--save_every_n_steps", "0", "--eval_samples", "4",
             "--min_noise_level", "0.0", "--max_noise_level", "1.0", "--holdout_fraction", "0.2", "--no_progress"]
    assert main(["train", "--output_dir", str(teacher_dir), "--cond_dropout", "0.3", "--learning_rate", "0.01",
                 *small]) == 0
    cfg = TrainConfig(chunked_embeddings_dir=str(data), output_dir=str(tmp_path / "x"), model_size="micro",
                      flow_map_share=0.75, distill_steps=1, distill_from=str(teacher_dir),
                      distill_guidance_scales="1,3", holdout_fraction=0.2, batch_size=16, **FULL)
    run = build(cfg)
    assert run.model.cfg.guidance_input
    batch = run.noise([run.train_set[i] for i in range(16)])
    jumps = batch["step"] > 0
    assert set(batch["guidance"][jumps].tolist()) == {1.0, 3.0}
    path = path_from(batch["target"], batch["noise"], batch["noise_level"], cfg.flow_config())
    new, _ = flow_map_targets(run.model, path, batch["condition"], None, batch["step"], cfg, nullcontext(),
                              run.teacher, batch["guidance"])
    teacher = Denoiser.from_pretrained(teacher_dir).model
    for g in (1.0, 3.0):
        rows = jumps & (batch["guidance"] == g)
        fn = model_velocity_fn(teacher, batch["condition"][rows], "velocity", guidance=g)
        with torch.no_grad():
            ref = teacher_target(lambda x, t: fn(x, t), path.x_t[rows], path.t[rows], batch["step"][rows], 1)
        assert torch.allclose(new.u_t[rows], ref, atol=1e-5), g

    # end to end: the student trains, and samples at any scale with one call per jump
    fast = tmp_path / "fast"
    assert main(["train", "--output_dir", str(fast), "--init_from", str(teacher_dir), "--distill_from",
                 str(teacher_dir), "--flow_map_share", "0.5", "--distill_guidance_scales", "1,2,3",
                 "--num_inference_steps", "2", *small]) == 0
    den = Denoiser.from_pretrained(fast)
    calls = []
    real_forward = den.model.forward

    def counting(*a, **k):
        calls.append(k.get("guidance"))
        return real_forward(*a, **k)

    den.model.forward = counting
    cond = torch.randn(2, 16, 16)
    g1, g3 = den.generate(cond, num_steps=2, seed=0), den.generate(cond, num_steps=2, seed=0, guidance=3.0)
    assert len(calls) == 4 and calls[:2] == [None, None] and all(float(c[0]) == 3.0 for c in calls[2:])
    assert not torch.allclose(g1, g3, atol=1e-4)
    out = tmp_path / "e.json"
    assert main(["evaluate", "--checkpoint", str(fast), "--chunked_embeddings_dir", str(data), "--guidance", "2",
                 "--noise_levels", "0.5", "--sample_counts", "2", "--no_distribution", "--output", str(out),
                 "--no_progress"]) == 0
    import json

    sw = tmp_path / "s.json"
    assert main(["sweep", "--checkpoint", str(fast), "--chunked_embeddings_dir", str(data), "--output", str(sw),
                 "--steps", "2", "--guidance_scales", "1,3", "--k", "2"]) == 0
    rows = json.loads(sw.read_text())["rows"]
    assert [(r["guidance"], r["calls"]) for r in rows] == [(1.0, 2), (3.0, 2)]  # the scale costs no extra call


@pytest.mark.parametrize("opts, needle", [
    ({"distill_guidance_scales": "1,2"}, "needs --distill_from"),
    ({"distill_guidance_scales": "1,2", "distill_from": "r", "distill_guidance": 2.0}, "replaces --distill_guidance"),
    ({"distill_guidance_scales": "1,x", "distill_from": "r"}, "numbers separated by commas"),
    ({"distill_guidance_scales": "1,-2", "distill_from": "r"}, "finite scales >= 0"),
])
def test_guidance_scale_options_are_checked(opts, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(chunked_embeddings_dir="x", flow_map_share=0.25, **FULL, **opts)
