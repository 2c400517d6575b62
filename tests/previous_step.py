"""A reference copy of the training step as it was before issue 21 (noise drawn in the main process,
one generator per sample; three reads of device values per step; torch's EMA update), kept to check
that the loader-side draws give bit-identical runs.

In a test: ``monkeypatch.setattr(T, "train_step", previous_train_step)``. As a script it is the
``train`` command with that step (for torchrun): ``python tests/previous_step.py --chunked_embeddings_dir ...``.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from blip3o_denoise import sphere  # noqa: E402
from blip3o_denoise import train as T  # noqa: E402
from blip3o_denoise.distributed import gradient_sync, is_main  # noqa: E402
from blip3o_denoise.flow import PathSample, flow_loss, sample_noise, sample_noise_level, sample_seed  # noqa: E402


def previous_sample_path(target, cfg, sample_seeds):
    x1 = sphere.normalize(target.float())
    gens = [torch.Generator().manual_seed(int(seed)) for seed in sample_seeds]
    noise_level = torch.cat([sample_noise_level(1, cfg, g) for g in gens])
    x0 = torch.stack([sample_noise(target.shape[1:], g) for g in gens]).to(target.device)
    s = noise_level.to(device=target.device, dtype=torch.float32)
    t = 1.0 - s
    if cfg.path == "euclidean":
        tb = sphere.broadcast_time(t, x1)
        return PathSample(x0, x1, (1.0 - tb) * x0 + tb * x1, t, x1 - x0)
    return PathSample(x0, x1, sphere.slerp(x0, x1, t), t, sphere.slerp_velocity(x0, x1, t))


def previous_condition_dropout(seeds, p, device):
    if p <= 0:
        return None
    return torch.tensor([float(torch.rand(1, generator=torch.Generator().manual_seed(sd ^ 0x5DEECE66D))) < p
                         for sd in seeds], device=device)


def previous_all_ranks_true(flag, device):
    if not dist.is_initialized():
        return flag
    t = torch.tensor(0.0 if flag else 1.0, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t == 0)


def previous_forward_backward(run, model, batches, epoch, autocast):
    cfg, flow_cfg, accum = run.cfg, run.cfg.flow_config(), len(batches)
    parts_sum, finite, samples = torch.zeros(3, device=run.device), True, 0
    for k, batch in enumerate(batches):
        target = batch["target"].to(run.device, non_blocking=True)
        cond = batch["condition"].to(run.device, non_blocking=True)
        seeds = [sample_seed(cfg.seed, epoch, int(i)) for i in batch["index"]]
        path = previous_sample_path(target, flow_cfg, seeds)
        drop = previous_condition_dropout(seeds, cfg.cond_dropout, run.device)
        with gradient_sync(model, cfg.fsdp, sync=k == accum - 1):
            with autocast:
                pred = model(path.x_t, path.t, cond, drop_mask=drop)
            loss, parts = flow_loss(pred, path, flow_cfg)
            finite = finite and bool(torch.isfinite(loss))
            (loss / accum).backward()
        parts_sum += torch.stack([loss.detach().float(), parts["mse"].float(), parts["sphere_penalty"].float()]) / accum
        samples += target.shape[0]
    return parts_sum, previous_all_ranks_true(finite, run.device), (pred, path), samples


def previous_train_step(run, model, batches, epoch, autocast):
    parts, finite, last, samples = previous_forward_backward(run, model, batches, epoch, autocast)
    diag = T._diagnostics(run.model, *last, run.cfg.flow_config()) if run.cfg.debug_mode and is_main() else None
    grad_norm = T.clip_gradients(run)
    if not finite or not bool(torch.isfinite(grad_norm)):
        return T.Step(parts, grad_norm, "loss" if not finite else "gradient", 0.0, samples, diag)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.ema.update_parameters(run.model)
    return T.Step(parts, grad_norm, None, lr, samples, diag)


if __name__ == "__main__":
    from blip3o_denoise.cli import main

    T.train_step = previous_train_step
    sys.exit(main(["train", *sys.argv[1:]]))
