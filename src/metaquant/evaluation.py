"""The test metrics of a network: mean cross-entropy, top-1 and top-5 accuracy, and the same with BatchNorm
statistics recomputed for the weights as they are."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batchnorm import batches_to_read, recompute_batchnorm_stats
from .distributed import all_reduce_sum, unwrap
from .validation import check_int

__all__ = ["evaluate", "precise_bn_metrics"]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent) of ``model`` in eval mode over ``(x, y)`` batches.

    Runs without gradients and restores ``model``'s mode. Under data parallelism the processes' sums are
    combined, so each returns the metrics of the whole set. With fewer than 5 classes "top-5" is top-``C``.

    Raises:
        ValueError: ``loader`` yielded no examples.

    Example:
        The logits themselves as the "model"; the loss is ``(2·log(1 + 2e⁻²) + log(e² + 2)) / 3``:

        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
        >>> batches = [(logits[:2], torch.tensor([0, 1])), (logits[2:], torch.tensor([0]))]
        >>> metrics = mq.evaluate(torch.nn.Identity(), batches)
        >>> round(metrics["loss"], 4), round(metrics["top1"], 2), metrics["top5"]
        (0.9062, 66.67, 100.0)
    """
    was_training = model.training
    model.eval()
    total, loss_sum, correct1, correct5 = 0, 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        total += y.numel()
    model.train(was_training)
    # data-parallel: each process evaluated its shard of the test set
    sums = all_reduce_sum([loss_sum, correct1, correct5, total])
    loss_sum, correct1, correct5, total = sums[0], int(sums[1]), int(sums[2]), int(sums[3])
    if total == 0:
        raise ValueError("evaluation loader yielded no examples")
    return {"loss": loss_sum / total, "top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def precise_bn_metrics(
    train_loader: Iterable[tuple[Tensor, Tensor]], test_loader: Iterable[tuple[Tensor, Tensor]], num_batches: int
) -> Callable[[nn.Module], dict[str, float]]:
    """``fit``'s ``extra_metrics``: ``test_loss_precise_bn`` and ``test_acc_precise_bn``, measured with
    BatchNorm statistics recomputed from ``num_batches`` training batches on a copy of the network.

    Raises:
        ValueError: ``num_batches`` is not an integer >= 1 (at once, not after the first epoch has trained).
    """
    num_batches = check_int("num_batches", num_batches, minimum=1)
    told: set[int] = set()  # a short train_loader is reported once, not after every epoch

    def measure(network: nn.Module) -> dict[str, float]:
        network = copy.deepcopy(unwrap(network))
        recompute_batchnorm_stats(network, train_loader, batches_to_read(train_loader, num_batches, told))
        result = evaluate(network, test_loader)
        return {"test_loss_precise_bn": result["loss"], "test_acc_precise_bn": result["top1"]}

    return measure
