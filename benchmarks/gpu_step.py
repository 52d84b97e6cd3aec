"""The GPU training step, measured in one call: the one-pass quantizer, whole-step graphs, compiled MultiFC.

What a GPU machine runs, in one command (``--device cuda``; every part also runs on a CPU, for checking):

1. **One-pass quantizer.** ``Ŵ`` of ResNet20's 22 weights by ``estimators.fake_quantize_many`` (one pass per
   shared quantizer) against one ``fake_quantize_preprocessed`` per weight, forward and backward: the time of
   each and the number of kernels launched (``torch.profiler``).
2. **Whole-step graphs.** One training step of ResNet20 (batch 128, 1-bit DoReFa, SGD) for ``fp``, ``ste`` and
   ``multifc``, eager (the reference), and as one function under ``torch.compile(mode="reduce-overhead")``
   (CUDA graphs over what dynamo captures: forward, backward, the meta step and the optimizer's update). The
   graphed losses must equal the eager ones (to 1e-3 relative over ``--check-steps`` steps from the same
   weights); then both are timed and the ratio printed. Graph breaks (Python-side checks of the trainers) are
   counted with ``torch._dynamo.explain``.
3. **Compiled model.** ``MetaQuant(torch.compile(model))`` against the eager model for MultiFC: the step time,
   and the share of the step spent outside the compiled forward (the meta step and the optimizer).
4. **One Fashion-MNIST epoch** of ResNet20 for STE and MultiFC through the command line
   (``benchmarks/cuda_check.py``'s measurement), if ``--data-dir`` holds the data set.

Targets: STE at most 1.15x and MultiFC at most 1.25x the full-precision eager
step; the graphed step at least 2x faster than eager for every method; one epoch under 3 s for STE and MultiFC.

    python benchmarks/gpu_step.py --device cuda --json > gpu_step.json
    python benchmarks/gpu_step.py --device cpu --skip graphs compiled epoch   # the parts that need no GPU
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import cuda_check  # a sibling script: its command-line epoch measurement
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import metaquant as mq
from metaquant.estimators import fake_quantize_many, fake_quantize_preprocessed

PARTS = ("quantizer", "graphs", "compiled", "epoch")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], Any], device: str, steps: int, repeats: int) -> float:
    """Fastest of ``repeats`` rounds of ``steps`` calls, per call."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def _kernels(fn: Callable[[], Any], device: str) -> int:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    kind = torch.autograd.DeviceType.CUDA if device.startswith("cuda") else torch.autograd.DeviceType.CPU
    return sum(1 for e in prof.events() if e.device_type == kind and not e.name.startswith("aten::"))


def quantizer(args: argparse.Namespace) -> dict[str, Any]:
    model = mq.quantize_(mq.models.resnet20(num_classes=10)).to(args.device)
    layers = list(mq.quantized_layers(model).values())
    weights = [layer.weight for layer in layers]
    quantizers = [layer.quantizer for layer in layers]

    def one_pass() -> None:
        outs = fake_quantize_many(weights, quantizers)
        sum(w_hat.sum() for w_hat, _ in outs).backward()

    def per_layer() -> None:
        outs = [fake_quantize_preprocessed(w, q) for w, q in zip(weights, quantizers)]
        sum(w_hat.sum() for w_hat, _ in outs).backward()

    result = {}
    for name, fn in (("one_pass", one_pass), ("per_layer", per_layer)):
        fn()
        result[name] = {
            "seconds": _seconds(fn, args.device, args.steps, args.repeats),
            "kernels": _kernels(fn, args.device),
        }
    result["speedup"] = result["per_layer"]["seconds"] / result["one_pass"]["seconds"]
    return result


def _trainer_step(method: str, device: str, forward_compiled: bool = False) -> tuple[Callable[[], Any], Any]:
    torch.manual_seed(0)
    model = mq.models.resnet20(num_classes=10)
    if method != "fp":
        mq.quantize_(model, mq.QuantConfig("dorefa", 1))
    model = mq.layout.use_fast_layout(model.to(device))
    x = torch.randn(128, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if forward_compiled else model
    closure = lambda: F.cross_entropy(forward(x), y)  # noqa: E731
    if method == "fp":

        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            loss = closure()
            loss.backward()
            opt.step()
            return loss.detach()

        return step, model
    trainer = mq.Trainer(model, opt) if method == "ste" else mq.MetaQuant(model, opt, mq.MultiFC(hidden=100))
    return (lambda: trainer.step(closure)), model


def graphs(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for method in ("fp", "ste", "multifc"):
        eager, _ = _trainer_step(method, args.device)
        reference = [float(eager()) for _ in range(args.check_steps)]
        step, _ = _trainer_step(method, args.device)
        graphed = torch.compile(step, mode="reduce-overhead")
        losses = [float(graphed()) for _ in range(args.check_steps)]
        close = all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(losses, reference))
        explained = torch._dynamo.explain(step)()
        eager_s = _seconds(eager, args.device, args.steps, args.repeats)
        graphed_s = _seconds(graphed, args.device, args.steps, args.repeats)
        result[method] = {
            "eager_seconds": eager_s,
            "graphed_seconds": graphed_s,
            "speedup": eager_s / graphed_s,
            "losses_match_eager": close,
            "graph_breaks": explained.graph_break_count,
        }
    fp = result["fp"]["eager_seconds"]
    for method in ("ste", "multifc"):
        result[method]["x_fp_eager"] = result[method]["eager_seconds"] / fp
        result[method]["graphed_x_fp_eager"] = result[method]["graphed_seconds"] / fp
    return result


def compiled(args: argparse.Namespace) -> dict[str, Any]:
    eager, _ = _trainer_step("multifc", args.device)
    comp, _ = _trainer_step("multifc", args.device, forward_compiled=True)
    for fn in (eager, comp):
        for _ in range(3):
            fn()
    return {
        "eager_seconds": _seconds(eager, args.device, args.steps, args.repeats),
        "compiled_forward_seconds": _seconds(comp, args.device, args.steps, args.repeats),
    }


def epoch(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"epoch": {}}
    cuda_check.epochs(report, args)
    return report["epoch"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50, help="timed calls per round (default 50)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the fastest counts (default 3)")
    parser.add_argument("--check-steps", type=int, default=5, help="steps compared with eager (default 5)")
    parser.add_argument("--data-dir", default=None, help="where Fashion-MNIST lies, for the epoch")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (use --device cpu to check the script)")
    parts: dict[str, Callable[[argparse.Namespace], Any]] = {
        "quantizer": quantizer,
        "graphs": graphs,
        "compiled": compiled,
        "epoch": epoch,
    }
    report = {"device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    for name, part in parts.items():
        if name not in args.skip:
            report[name] = part(args)
            if not args.json:
                print(name, json.dumps(report[name], indent=1))
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
