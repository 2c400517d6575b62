"""What a run tells its user: the progress bar, ``metrics.jsonl``, TensorBoard / Weights & Biases, the
console, and the divergence watch. Only rank 0 writes; the averaging of logged numbers over the
processes happens here too, so every rank calls :meth:`TrainLog.step`."""

from __future__ import annotations

import collections
import json
import os
import statistics
import time
from pathlib import Path

import torch

from .distributed import mean_over_ranks, world


class TrainingError(RuntimeError):
    """A run that cannot go on for a reason the user can act on (it diverged, an optional package is
    missing). The command line prints it as one ``error:`` line."""


class DivergenceWatch:
    """Finite divergence: the logged loss above ``factor`` x the median of the last ``window`` logged
    losses for ``patience`` logs in a row. Non-finite steps are skipped elsewhere; this catches a run
    that stays finite but blows up. Events go to the console and to ``results.json["divergence"]``."""

    def __init__(self, factor: float = 100.0, window: int = 50, patience: int = 3):
        self.factor, self.patience = factor, patience
        self.history: collections.deque = collections.deque(maxlen=window)
        self.in_a_row = 0
        self.events: list[dict] = []

    def update(self, step: int, loss: float) -> dict | None:
        median = statistics.median(self.history) if len(self.history) >= 5 else None
        if median is not None and loss > self.factor * median:
            self.in_a_row += 1
        else:
            self.in_a_row = 0
            self.history.append(loss)  # a spike never enters the reference it is judged against
        if self.in_a_row != self.patience:
            return None
        event = {"step": step, "loss": loss, "running_median": median, "factor": self.factor}
        self.events.append(event)
        return event


class Reporter:
    """metrics.jsonl always; TensorBoard or Weights & Biases when asked for (and installed).

    On a resume from step ``resume_step`` the records a killed run wrote after that step (which the
    resumed run replays) are dropped first, with a line torn by the kill, so every step appears once.
    """

    def __init__(self, out_dir: Path, report_to: str, config: dict, resume_step: int | None = None):
        self.path = out_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if resume_step is not None:
            self._truncate_after(resume_step)
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise TrainingError("--report_to tensorboard needs `pip install blip3o-denoise[tensorboard]`") from e
            purge = resume_step + 1 if resume_step is not None else None  # hide the replayed steps' events
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError as e:
                raise TrainingError("--report_to wandb needs `pip install blip3o-denoise[wandb]` "
                                    "(WANDB_MODE=offline works)") from e
            self.wandb = wandb.init(project="blip3o-denoise", config=config, dir=str(out_dir))

    def _truncate_after(self, step: int) -> None:
        """Keep the records of steps <= ``step`` (not a final evaluation at ``step``: it is redone)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                continue
            if rec["step"] < step or (rec["step"] == step and not rec.get("final")):
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in _flatten(record).items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


class TrainLog:
    """The training loop's voice: a progress bar and the reporter on rank 0, silence elsewhere.

    ``step`` logs every ``log_every`` steps (and the first, the last, and every step in debug mode):
    the loss parts averaged over the processes, the gradient norm, learning rate and throughput.
    """

    def __init__(self, out_dir: Path, report_to: str, run_config: dict, resume_step: int | None, main: bool,
                 progress: bool, start_step: int, total_steps: int, log_every: int, debug: bool):
        self.main, self.total, self.log_every, self.debug = main, total_steps, log_every, debug
        self.reporter = Reporter(out_dir, report_to, run_config, resume_step) if main else None
        self.bar = None
        if main and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=1.0)
        self.watch = DivergenceWatch()
        self.t_last, self.samples = time.time(), 0

    def say(self, msg: str) -> None:
        """Print on rank 0 (through the bar, so it stays intact)."""
        if self.main:
            (self.bar.write if self.bar is not None else print)(msg)

    def record(self, record: dict) -> None:
        if self.reporter is not None:
            self.reporter.log(record)

    def step(self, step: int, epoch: int, parts: torch.Tensor, grad_norm, lr: float, skipped: int,
             diag: dict | None = None) -> None:
        """After optimizer step ``step``; ``parts`` = [loss, mse, sphere_penalty] of this rank's step."""
        if not (step % self.log_every == 0 or step == 1 or self.debug or step == self.total):
            if self.bar is not None:
                self.bar.update(1)
            return
        logged = mean_over_ranks(parts)  # every rank takes part, only rank 0 writes
        if self.main:
            now = time.time()
            if (event := self.watch.update(step, float(logged[0]))) is not None:
                self.say(f"warning: step {step}: loss {event['loss']:.4g} is above {event['factor']:g}x its running "
                         f"median {event['running_median']:.4g} for {self.watch.patience} logged steps in a row: the "
                         "run is diverging (lower --learning_rate?); recorded in results.json")
            record = {
                "step": step, "epoch": epoch, "loss": float(logged[0]), "mse": float(logged[1]),
                "sphere_penalty": float(logged[2]), "grad_norm": float(grad_norm), "lr": lr,
                "samples_per_s": self.samples * world()[1] / max(now - self.t_last, 1e-9),
                "skipped_nonfinite": skipped,
            }
            if diag is not None:
                record["debug"] = diag
            self.record(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     sps=f"{record['samples_per_s']:.0f}")
            if self.debug:
                print(json.dumps(record))
            self.t_last, self.samples = now, 0
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self) -> None:
        self.close()
        if self.reporter is not None:
            self.reporter.close()
