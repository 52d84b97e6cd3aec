"""Time of one training step: a plain PyTorch step (the limit), STE and MetaQuant with each meta quantizer.

What is measured: one training step of ResNet20 (``mq.models.resnet20(num_classes=10)``) on a random CIFAR-sized
batch (``--batch-size`` x 3 x 32 x 32, default 128), plain SGD (lr 1e-3), float32 unless ``--amp bf16``. Methods:

* ``fp``         the same network, not quantized, the plainest PyTorch step there is (``zero_grad``, forward,
                 ``cross_entropy``, ``backward``, ``step``): the limit any quantized training is compared with;
* ``ste``        1-bit DoReFa weights on every layer (``mq.quantize_(model, mq.QuantConfig("dorefa", 1))``),
                 ``mq.Trainer`` (clipped STE): the paper's baseline;
* ``fc-grad``, ``multifc``, ``lstmfc``, ``lstmfc-16``   the same quantized network trained by ``mq.MetaQuant``
                 with ``FCGrad(hidden=100)``, ``MultiFC(hidden=100)``, ``LSTMFC(hidden=100)`` (the paper's sizes,
                 the default STE start: one element-wise operation more than the paper's form) and
                 ``LSTMFC(hidden=16)``, ``meta_lr=1e-3``; ``lstmfc-keep``: ``LSTMFC(hidden=100, keep_gates=1)``,
                 which keeps the gates instead of recomputing them (fastest where freed memory is reused,
                 docs/performance.md);
* ``ste-kd``     STE on the loss of knowledge distillation (``mq.Distillation``, weight 0.9, temperature 4) from
                 the full-precision ResNet20 as teacher: the cost of the teacher's forward pass.

Each method runs in two layouts:

* ``python``     the model and the batches as PyTorch makes them (contiguous, NCHW), everything else left to
                 the library's defaults (the README's quick start without ``mq.layout.use_fast_layout``);
* ``cli``        as the ``metaquant`` program runs it: channels-last model and batches (``mq.layout``), in a
                 process whose allocator keeps freed memory for reuse (``allocator.reuse_freed_memory``), LSTMFC
                 keeping the gates the program lets it keep (``builders.lstm_keep_share``); for ``fp``, the
                 plain step with ``model.to(memory_format=torch.channels_last)`` and channels-last batches, in
                 the same process.

Each layout is measured in a process of its own (the allocator's settings are the process's), and the limit
is the faster of the two plain steps. In a layout's process every method is built and timed in rounds (each
one ``--steps`` steps per round, after three warm-up steps: MetaQuant's first step is a plain one); a time is
the fastest of its rounds (``--repeats``), which removes most of the drift of a shared machine, and ratios are
taken against the limit (``x_limit``) and STE in the same layout (``x_ste``).
``--memory`` also measures each one's peak memory in a process of its own (peak RSS on a CPU,
``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/step_time.py                       # a table
    python benchmarks/step_time.py --json                # {"limit": ..., "methods": {method: {layout: ...}}}
    python benchmarks/step_time.py --methods fp ste --layouts cli --steps 5 --repeats 2 --device cuda

On a CPU shared with other work, OpenMP threads spin while they wait for each other and wall-clock times swing;
``OMP_WAIT_POLICY=PASSIVE`` removes most of that, and ``--threads 1 --cpu-time`` gives the steadiest ratios. On
an idle machine leave the policy alone: a passive thread is woken for every parallel operation (about 50 us), which
slows the quantized steps, made of more small operations, more than the plain one (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import metaquant as mq
from metaquant.experiments.allocator import reuse_freed_memory
from metaquant.experiments.builders import lstm_keep_share, quantized_numel

METHODS = ("fp", "ste", "fc-grad", "multifc", "lstmfc", "lstmfc-keep", "lstmfc-16", "ste-kd")
LAYOUTS = ("python", "cli")
WARMUP_STEPS = 3
META = {
    "fc-grad": lambda: mq.FCGrad(hidden=100),
    "multifc": lambda: mq.MultiFC(hidden=100),
    "lstmfc": lambda: mq.LSTMFC(hidden=100),
    "lstmfc-keep": lambda: mq.LSTMFC(hidden=100, keep_gates=1.0),
    "lstmfc-16": lambda: mq.LSTMFC(hidden=16),
}


def _plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[Callable[[], Any]], Any]:
    def step(closure: Callable[[], Any]) -> Any:
        opt.zero_grad(set_to_none=True)
        loss = closure()
        loss.backward()
        opt.step()
        return loss

    return step


def build(method: str, layout: str, args: argparse.Namespace) -> Callable[[], Any]:
    """One step of ``method`` in ``layout`` on its own model and batch, as a function of nothing."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = mq.models.resnet20(num_classes=10)
    if method != "fp":
        mq.quantize_(model, mq.QuantConfig("dorefa", 1))
    model.to(device)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    if layout == "cli" and method == "fp":  # by hand, as a PyTorch user writes it
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "cli":  # as the command line's pipeline does it
        fmt = mq.layout.preferred_memory_format(model)
        mq.layout.apply_memory_format(model, fmt)
        x = mq.layout.format_batch(x, fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if args.compile else model
    if method == "fp":
        step = _plain_step(model, opt)
    elif method in ("ste", "ste-kd"):
        step = mq.Trainer(model, opt).step
    else:
        step = mq.MetaQuant(model, opt, meta=_meta(method, layout, model), meta_lr=1e-3).step
    criterion: Callable[..., Any] = lambda logits, y, x: F.cross_entropy(logits, y)  # noqa: E731
    if method == "ste-kd":
        teacher = mq.models.resnet20(num_classes=10).to(device)
        if layout == "cli":
            teacher.to(memory_format=torch.channels_last)
        criterion = mq.Distillation(teacher, weight=0.9, temperature=4.0)

    def closure() -> Any:
        if args.amp == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                logits = forward(x)
            return criterion(logits.float(), y, x)
        return criterion(forward(x), y, x)

    return lambda: step(closure)


def _meta(method: str, layout: str, model: torch.nn.Module) -> mq.MetaQuantizer:
    """``method``'s meta quantizer; in the ``cli`` layout an LSTMFC keeps the gates the program keeps."""
    meta = META[method]()
    if layout == "cli" and method in ("lstmfc", "lstmfc-16"):
        assert isinstance(meta, mq.LSTMFC)
        keep = lstm_keep_share(quantized_numel(model), meta.hidden, meta.num_lstm)
        meta = mq.LSTMFC(hidden=meta.hidden, keep_gates=keep)
    return meta


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[], Any], args: argparse.Namespace) -> float:
    """Seconds per step over ``args.steps`` steps."""
    clock = time.process_time if args.cpu_time else time.perf_counter
    _sync(args.device)
    start = clock()
    for _ in range(args.steps):
        step()
    _sync(args.device)
    return (clock() - start) / args.steps


def peak_memory(method: str, layout: str, args: argparse.Namespace) -> float:
    """Peak memory (MB) of ``method`` in ``layout``, measured in a process of its own."""
    cmd = [sys.executable, __file__, "--peak-of", method, layout, "--batch-size", str(args.batch_size)]
    cmd += ["--device", args.device, "--amp", args.amp] + (["--compile"] if args.compile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} ({layout}) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def _peak_child(method: str, layout: str, args: argparse.Namespace) -> float:
    if layout == "cli":
        reuse_freed_memory()
    step = build(method, layout, args)
    for _ in range(WARMUP_STEPS + 2):
        step()
    if args.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every method in every layout, each layout in a process of its own; the limit the faster plain step."""
    if len(args.layouts) == 1:
        return run_layout(args)
    parts = [_layout_child(layout, args) for layout in args.layouts]
    plain = [(part["limit"]["layout"], part["limit"]["seconds_per_step"]) for part in parts if part["limit"]]
    limit = min(plain, key=lambda item: item[1]) if plain else None
    methods: dict[str, dict[str, Any]] = {}
    for part in parts:
        for method, layouts in part["methods"].items():
            for layout, entry in layouts.items():
                entry["x_limit"] = entry["seconds_per_step"] / limit[1] if limit else None
                methods.setdefault(method, {})[layout] = entry
    reused = [layout for part in parts for layout in part["freed_memory_reused"]]
    return {
        "limit": None if limit is None else {"layout": limit[0], "seconds_per_step": limit[1]},
        "methods": methods,
        "freed_memory_reused": reused,
        "settings": settings(args, reused),
    }


def _layout_child(layout: str, args: argparse.Namespace) -> dict[str, Any]:
    """``run_layout`` of ``layout`` in a process of its own, with the same options."""
    cmd = [sys.executable, __file__, "--json", "--layouts", layout, "--methods", *args.methods]
    cmd += ["--steps", str(args.steps), "--repeats", str(args.repeats), "--batch-size", str(args.batch_size)]
    cmd += ["--device", args.device, "--amp", args.amp] + (["--compile"] if args.compile else [])
    cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--cpu-time"] if args.cpu_time else [])
    cmd += ["--memory"] if args.memory else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {layout} layout failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run_layout(args: argparse.Namespace) -> dict[str, Any]:
    """Every method in the one layout of ``args``, interleaved in rounds; the fastest round of each."""
    reused = args.layouts == ["cli"] and reuse_freed_memory()  # False where the environment sets malloc's own
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {(m, layout): build(m, layout, args) for m in args.methods for layout in args.layouts}
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.repeats):
        for key, step in steps.items():
            seconds = time_steps(step, args)
            best[key] = min(best.get(key, seconds), seconds)
    plain = {layout: s for (m, layout), s in best.items() if m == "fp"}
    limit = min(plain.items(), key=lambda item: item[1]) if plain else None
    methods: dict[str, dict[str, Any]] = {}
    for (m, layout), seconds in best.items():
        ste = best.get(("ste", layout))
        entry: dict[str, Any] = {
            "seconds_per_step": seconds,
            "x_limit": seconds / limit[1] if limit else None,
            "x_ste": seconds / ste if ste else None,
        }
        if args.memory:
            entry["peak_mb"] = peak_memory(m, layout, args)
        methods.setdefault(m, {})[layout] = entry
    return {
        "limit": None if limit is None else {"layout": limit[0], "seconds_per_step": limit[1]},
        "methods": methods,
        "freed_memory_reused": args.layouts if reused else [],
        "settings": settings(args, args.layouts if reused else []),
    }


def settings(args: argparse.Namespace, reused: list[str]) -> str:
    return ", ".join(
        [f"ResNet20, 1-bit DoReFa, batch {args.batch_size}, {args.steps} timed steps on {args.device}"]
        + [f"freed memory reused in the {layout} layout" for layout in reused]
        + [f"glibc's defaults in the {layout} layout" for layout in args.layouts if layout not in reused]
        + (["torch.compile"] if args.compile else [])
        + ([f"autocast {args.amp}"] if args.amp != "none" else [])
        + ([f"{args.threads} thread(s)"] if args.threads else [])
        + (["CPU time"] if args.cpu_time else [])
        + [f"fastest of {args.repeats} round(s)", f"torch {torch.__version__}"]
    )


def table(results: dict[str, Any]) -> str:
    def ratio(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    limit = results["limit"]
    lines = [results["settings"]]
    if limit:
        lines.append(f"limit: the plain step, {limit['layout']} layout, {limit['seconds_per_step']:.4f} s")
    lines.append(f"{'method':<10} {'layout':<7} {'s/step':>8} {'x limit':>8} {'x STE':>6} {'peak MB':>8}")
    for method, layouts in results["methods"].items():
        for layout, r in layouts.items():
            peak = f"{r['peak_mb']:>8.0f}" if "peak_mb" in r else f"{'-':>8}"
            lines.append(
                f"{method:<10} {layout:<7} {r['seconds_per_step']:>8.4f} {ratio(r['x_limit']):>8} "
                f"{ratio(r['x_ste']):>6} {peak}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the fastest counts (default 3)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--memory", action="store_true", help="also measure each one's peak memory")
    parser.add_argument("--compile", action="store_true", help="run the forward pass through torch.compile")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast the forward pass")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="the process's CPU time instead of wall-clock")
    parser.add_argument("--peak-of", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.batch_size < 1:
        parser.error("--steps, --repeats and --batch-size must be >= 1")
    if args.cpu_time and args.device.startswith("cuda"):
        parser.error("--cpu-time measures CPU work; on CUDA the wall-clock time is the measure")
    if args.peak_of:
        print(_peak_child(*args.peak_of, args))
        return
    results = run(args)
    print(json.dumps(results) if args.json else table(results))


if __name__ == "__main__":
    main()
