"""Devices and processes: the process group under torchrun, DDP / FSDP wrapping, full state dicts gathered
from shards, the per-rank sampler. With one process every function here is a plain pass-through."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device; a ValueError (naming the flag) for one this machine does not have."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: not a supported device (expected auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (this torch {torch.__version__} "
                             f"{'has no CUDA support' if torch.version.cuda is None else 'finds no GPU'}); "
                             "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


@contextmanager
def process_group(device: str):
    """Join the torchrun process group (NCCL on GPUs, gloo otherwise) for the duration of the block;
    nothing happens when there is one process or the caller already joined one."""
    started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if started:
        backend = "nccl" if torch.cuda.is_available() and device in ("auto", "cuda") else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        yield
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_ranks_max(t: torch.Tensor) -> torch.Tensor:
    """The elementwise max of ``t`` over the processes (collective, on the device: the host does not wait)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the processes (collective); a copy of ``t`` with one process."""
    t = t.clone()
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers (in either order)."""
    model = getattr(model, "_orig_mod", model)
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "_orig_mod", model)


def is_fsdp(module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in module.parameters())


def shard(*models) -> None:
    """FSDP (torch's ``fully_shard``): each block, then the whole model. The EMA copy is sharded exactly
    like the model, so its update is a local lerp of shards."""
    if not dist.is_initialized():
        raise ValueError("--fsdp shards the model across processes: launch with torchrun and more than one process")
    from torch.distributed.fsdp import fully_shard

    for m in models:
        for blk in [*m.blocks, *(m.head.blocks if m.head is not None else ())]:
            fully_shard(blk)
        fully_shard(m)


def wrap_for_training(model, device: torch.device, fsdp: bool, compile: bool):
    """DDP around the model under torchrun (FSDP models are already sharded), then torch.compile if asked."""
    if dist.is_initialized() and not fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    return model


def gradient_sync(model, fsdp: bool, sync: bool):
    """A context for one micro-batch's backward: gradients are reduced across processes only when ``sync``
    (the last micro-batch of an accumulated step)."""
    if fsdp:
        model.set_requires_gradient_sync(sync)
    if not sync and isinstance(model, DDP):
        return model.no_sync()
    return nullcontext()


def full_model_state(module) -> dict:
    """The module's complete state dict on the CPU. Collective under FSDP (every rank must call it;
    rank 0 receives the tensors)."""
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().contiguous() for k, v in unwrap(module).state_dict().items()}


def full_optimizer_state(model, optimizer) -> dict:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_model_state(module, sd: dict) -> None:
    """Load a full (unsharded) state dict into a plain or FSDP-sharded module."""
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(module).load_state_dict(sd)


def load_full_state(model, optimizer, model_sd: dict, optim_sd: dict) -> None:
    load_full_model_state(model, model_sd)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # parameters that never received a gradient (the null condition without --cond_dropout)
        # have no optimizer state, in the checkpoint or here
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_sd,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        optimizer.load_state_dict(optim_sd)


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (equal per-rank lengths, per-epoch reshuffle) that can start mid-epoch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self):
        it = list(super().__iter__())
        return iter(it[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip
