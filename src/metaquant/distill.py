"""Knowledge distillation: a quantized student learns from its full-precision teacher's predictions.

The loss of Hinton, Vinyals and Dean (2015) mixes the cross-entropy with the labels and the KL divergence
from the teacher's softened predictions to the student's::

    L = (1 − λ)·CE(z_s, y) + λ·T²·KL( softmax(z_t / T) ‖ softmax(z_s / T) )

with student logits ``z_s``, teacher logits ``z_t``, temperature ``T`` and weight ``λ`` in [0, 1]. The ``T²``
keeps the soft term's gradient (which scales as ``1/T²``) on the hard term's scale; ``λ = 0`` is plain
cross-entropy. The natural teacher is the full-precision model the network was quantized from: its
predictions say which wrong classes are nearly right, which a noisily trained 1-bit network can use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import check_number

__all__ = ["distillation_loss", "Distillation", "check_distillation", "TEMPERATURE_RANGE"]

#: Allowed temperatures: beyond them ``T²`` or ``z / T`` leave the range where the loss is computed exactly.
TEMPERATURE_RANGE = (0.01, 1000.0)


def check_distillation(weight: float, temperature: float) -> None:
    """Refuse a weight outside [0, 1] or a temperature outside :data:`TEMPERATURE_RANGE`, naming the value."""
    check_number("distill_weight", weight, 0, 1)
    check_number("distill_temperature", temperature, *TEMPERATURE_RANGE)


def distillation_loss(
    logits: Tensor, targets: Tensor, teacher_logits: Tensor, *, weight: float, temperature: float
) -> Tensor:
    """``(1 − λ)·CE(z_s, y) + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` for logits ``[B, K]``, batch mean.

    No gradient flows into ``teacher_logits``; the loss has the dtype of ``logits``.

    Raises:
        ValueError: ``weight`` or ``temperature`` out of range; logits of different shapes.
    """
    check_distillation(weight, temperature)
    if logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape"
        )
    hard = F.cross_entropy(logits, targets)
    if weight == 0:
        return hard
    log_student = F.log_softmax(logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().to(logits.dtype) / temperature, dim=1)
    # KL(p_t ‖ p_s) summed over classes, averaged over the batch ("batchmean": the divergence per example).
    soft = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * temperature**2 * soft


class Distillation:
    """The loss of a student trained against a frozen ``teacher``, ``(logits, targets, inputs) -> loss``: ``fit``'s
    ``criterion``.

    The teacher runs on the same batch in evaluation mode (its BatchNorm uses running statistics), without
    gradients; its parameters are frozen so no optimizer or gradient hook sees them. See ``distillation_loss``.

    Raises:
        ValueError: ``weight`` or ``temperature`` out of range.

    Example:
        >>> teacher = torch.nn.Linear(4, 3)
        >>> loss_fn = mq.Distillation(teacher, weight=0.5, temperature=2.0)
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> student_logits = torch.zeros(5, 3, requires_grad=True)
        >>> loss_fn(student_logits, y, x).backward()
        >>> teacher.weight.grad is None, student_logits.grad.shape
        (True, torch.Size([5, 3]))
    """

    def __init__(self, teacher: nn.Module, *, weight: float, temperature: float) -> None:
        check_distillation(weight, temperature)
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight = weight
        self.temperature = temperature

    def __call__(self, logits: Tensor, targets: Tensor, inputs: Tensor) -> Tensor:
        if self.weight == 0:  # the labels alone: no need to run the teacher
            return F.cross_entropy(logits, targets)
        if self.teacher.training:
            raise RuntimeError(
                "the teacher was put back in training mode; its BatchNorm would use the batch's statistics"
            )
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        return distillation_loss(logits, targets, teacher_logits, weight=self.weight, temperature=self.temperature)

    def __repr__(self) -> str:
        return (
            f"Distillation(teacher={type(self.teacher).__name__}, weight={self.weight}, temperature={self.temperature})"
        )
