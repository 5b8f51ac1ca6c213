"""Recovery after compression: fine-tune the compressed student to match the dense teacher.

Example::

    teacher = copy.deepcopy(model)
    student, report = kronlayers.compress(model, "lowrank", rank=0.1, calibration=batches)
    history = distill(student, teacher, batches, steps=500, lr=1e-3, loss="kl")

No labels are needed: the target is the teacher's output on the same inputs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import progress_bar, run_batch

__all__ = ["DistillResult", "distill", "output_tensor"]

_LOSSES = ("mse", "kl")
_SCHEDULES = ("cosine", "constant")


@dataclass
class DistillResult:
    """What :func:`distill` did.

    Attributes:
        losses: the loss of every step (before that step's update).
        steps: steps run (fewer than asked if a one-shot iterable ran out).
        first_loss, last_loss: the mean loss over the first and last ``window`` steps.
    """

    losses: list[float] = field(default_factory=list)
    steps: int = 0

    def _mean(self, part: list[float]) -> float:
        return sum(part) / len(part) if part else math.nan

    @property
    def window(self) -> int:
        """Steps averaged by ``first_loss`` / ``last_loss``: a fifth of the run, 1 to 50."""
        return max(1, min(50, len(self.losses) // 5))

    @property
    def first_loss(self) -> float:
        return self._mean(self.losses[: self.window])

    @property
    def last_loss(self) -> float:
        return self._mean(self.losses[-self.window :] if self.losses else [])


def output_tensor(out: object) -> torch.Tensor:
    """The tensor to match in a model output: the tensor itself, ``out.logits`` /
    ``out["logits"]`` if present, else the first tensor of a tuple, list or mapping."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    else:
        values = []
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"cannot find an output tensor in a {type(out).__name__}")


def _loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float):
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    # KL(teacher || student) over the last dimension, averaged over the other positions.
    t = temperature
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() * (t * t)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[object],
    *,
    steps: int,
    lr: float = 1e-3,
    loss: str = "mse",
    temperature: float = 1.0,
    optimizer: torch.optim.Optimizer | None = None,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    progress: bool = True,
    log_every: int = 50,
) -> DistillResult:
    """Fine-tune ``student`` for ``steps`` steps to reproduce ``teacher``'s outputs.

    Each step runs both models on the next batch (:func:`kronlayers.calibration.run_batch`:
    a tensor is ``model(x)``, a tuple / list ``model(*x)``, a dict ``model(**x)``; the
    teacher in eval mode under ``no_grad``, the student in train mode), computes the loss
    between their outputs (:func:`output_tensor`: the tensor, ``logits``, or the first
    tensor) and takes one optimizer step on the student's trainable parameters. A
    re-iterable ``batches`` (a list, a ``DataLoader``) is cycled; a one-shot iterator
    ends the run early when exhausted.

    Args:
        student: the compressed model (modified in place; its training flags are restored).
        teacher: the dense model (not modified).
        batches: an iterable of model inputs.
        steps: optimizer steps, ``>= 1``.
        lr: learning rate of the default optimizer, AdamW.
        loss: ``"mse"`` on the outputs, or ``"kl"``: ``KL(softmax(t / T) || softmax(s / T))``
            over the last dimension times ``T^2`` (for logits or log-probabilities).
        temperature: ``T`` of ``"kl"``.
        optimizer: an optimizer over the student's parameters to use instead of AdamW.
        weight_decay: AdamW's weight decay (default 0: the target is the teacher, not a prior).
        schedule: ``"cosine"`` (default: the learning rate decays from ``lr`` to 0 over
            ``steps`` along a half cosine, the usual fine-tuning schedule) or ``"constant"``.
            Applied to ``optimizer`` too when one is given.
        progress: show a tqdm bar with the running loss; the first and last mean losses are
            printed at the end.
        log_every: refresh the bar's loss every this many steps.

    Returns:
        A :class:`DistillResult` with every step's loss.
    """
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"batches must be an iterable of model inputs, got {type(batches).__name__}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a float, got {type(lr).__name__}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    params = [p for p in student.parameters() if p.requires_grad]
    if optimizer is None:
        if not params:
            raise ValueError("student has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = None
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, steps) / steps))
        )
    reiterable = iter(batches) is not batches
    source = itertools.cycle([None]) if reiterable else [None]

    def stream():
        for _ in source:
            yielded = False
            for b in batches:
                yielded = True
                yield b
            if not yielded:
                return

    flags_s = {m: m.training for m in student.modules()}
    flags_t = {m: m.training for m in teacher.modules()}
    teacher.eval()
    student.train()
    result = DistillResult()
    bar = progress_bar(range(steps), enabled=progress, desc=f"distill ({loss})", unit="step")
    it = stream()
    try:
        for step in bar:
            try:
                batch = next(it)
            except StopIteration:
                break
            with torch.no_grad():
                target = output_tensor(run_batch(teacher, batch)).detach()
            out = output_tensor(run_batch(student, batch))
            value = _loss(out, target, loss, temperature)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            result.losses.append(float(value.detach()))
            result.steps += 1
            if progress and hasattr(bar, "set_postfix") and (step % log_every == 0):
                recent = result.losses[-log_every:]
                bar.set_postfix({loss: f"{sum(recent) / len(recent):.4g}"})
    finally:
        for m, f in flags_s.items():
            m.training = f
        for m, f in flags_t.items():
            m.training = f
    if progress:
        print(
            f"distill: {result.steps} steps, {loss} loss {result.first_loss:.4g} (first steps) "
            f"-> {result.last_loss:.4g} (last steps)",
            flush=True,
        )
    return result
