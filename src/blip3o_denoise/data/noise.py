"""Each training sample's randomness, drawn where its batch is collated: in the loader's workers.

A sample's noise, noise level and condition-dropout draw depend only on (run seed, epoch, sample
index), through one generator per sample, so they are the same with any number of workers or
processes, any batch size, and after a resume; drawing them in the workers keeps the main process
(which feeds the device) free of work that grows with the batch.
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from ..flow import FlowConfig, draw_sample, sample_seed
from ..flowmap import draw_consistency

# The condition-dropout draw uses its own generator, seeded apart from the noise's.
DROPOUT_SALT = 0x5DEECE66D
GUIDANCE_SALT = 0x9E3779B97F4A7C15  # a jump sample's guidance scale (--distill_guidance_scales)


def condition_dropped(seed: int, p: float) -> bool:
    """Whether the sample with this seed trains with the null condition (probability ``p``)."""
    return float(torch.rand(1, generator=torch.Generator().manual_seed(seed ^ DROPOUT_SALT))) < p


class NoiseCollate:
    """``default_collate`` of ``{"target", "condition", "index"}`` items, plus the draws of each sample:
    ``noise [B, N, D]`` (unit tokens), ``noise_level [B]``, when ``cond_dropout > 0`` ``drop [B]``, and
    for a flow map (``flow_map_share > 0``) ``step [B]``: the jump each sample trains, 0 for flow matching,
    and with ``guidance_scales`` ``guidance [B]``: each jump sample's scale, drawn from them (1 for the rest).

    Set :attr:`epoch` before the loader creates its iterator: worker processes take a copy then.
    """

    def __init__(self, flow: FlowConfig, seed: int, cond_dropout: float = 0.0, epoch: int = 0,
                 flow_map_share: float = 0.0, flow_map_min_step: float = 1 / 128,
                 guidance_scales: tuple[float, ...] = ()):
        self.flow, self.seed, self.cond_dropout, self.epoch = flow, seed, cond_dropout, epoch
        self.flow_map_share, self.flow_map_min_step = flow_map_share, flow_map_min_step
        self.guidance_scales = tuple(guidance_scales)

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
        seeds = [sample_seed(self.seed, self.epoch, int(it["index"])) for it in items]
        shape = batch["target"].shape[1:]
        draws = [draw_sample(s, shape, self.flow) for s in seeds]
        batch["noise_level"] = torch.cat([level for level, _ in draws])
        batch["noise"] = torch.stack([x for _, x in draws])
        if self.cond_dropout > 0:
            batch["drop"] = torch.tensor([condition_dropped(s, self.cond_dropout) for s in seeds])
        if self.flow_map_share > 0:  # a jump sample trains from a start time on its jump's grid
            two_d, t = draw_consistency(seeds, self.flow_map_share, self.flow_map_min_step,
                                        1.0 - self.flow.max_noise_level, 1.0 - self.flow.min_noise_level)
            jump = two_d > 0
            batch["noise_level"] = torch.where(jump, 1.0 - t, batch["noise_level"]).to(batch["noise_level"].dtype)
            batch["step"] = two_d
            if self.guidance_scales:  # each jump sample's guidance scale (1 for flow matching)
                g = [self.guidance_scales[int(torch.randint(len(self.guidance_scales), (1,), generator=torch.Generator()
                                                            .manual_seed(s ^ GUIDANCE_SALT)))] for s in seeds]
                batch["guidance"] = torch.where(jump, torch.tensor(g, dtype=torch.float32), 1.0)
        return batch
