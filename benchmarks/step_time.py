"""Time and peak memory of one training step: full precision, STE and MetaQuant with each meta quantizer.

What is measured: one training step of ResNet20 (``mq.models.resnet20(num_classes=10)``) on a random CIFAR-sized
batch (``--batch-size`` x 3 x 32 x 32, default 128), plain SGD (lr 1e-3), in the library's default settings:
channels-last layout (``mq.layout``), float32 unless ``--amp bf16``. Methods:

* ``fp``         the same network, not quantized, a plain ``torch.optim`` step (zero_grad, backward, step): the
                 limit any quantized training is compared with;
* ``ste``        1-bit DoReFa weights on every layer (``mq.quantize_(model, mq.QuantConfig("dorefa", 1))``),
                 ``mq.Trainer`` (clipped STE): the paper's baseline;
* ``fc-grad``, ``multifc``, ``lstmfc``, ``lstmfc-16``   the same quantized network trained by ``mq.MetaQuant``
                 with ``FCGrad(hidden=100)``, ``MultiFC(hidden=100)``, ``LSTMFC(hidden=100)`` (the paper's) and
                 ``LSTMFC(hidden=16)``, ``meta_lr=1e-3``;
* ``ste-kd``     STE on the loss of knowledge distillation (``mq.Distillation``, weight 0.9, temperature 4) from
                 the full-precision ResNet20 as teacher (evaluation mode, no gradient): the cost of the teacher's
                 forward pass, which the ``fashion-mnist-full`` preset's best recipe pays.

How: every method runs in a child process of its own, so that its peak memory is its own: peak resident set
(``ru_maxrss``) on a CPU, ``torch.cuda.max_memory_allocated`` on CUDA (after ``reset_peak_memory_stats``). A
child first runs three warm-up steps (MetaQuant's first step is a plain one: it only records ``g_Ŵ``), then
times ``--steps`` steps (synchronizing CUDA) and reports seconds per step. All children run in this one command,
in rounds (every method once per round, ``--repeats`` rounds); a method's time is its fastest round, which
removes most of the drift of a shared machine, and its memory the smallest peak of its rounds. Ratios are taken
against ``fp`` (x fp) and ``ste`` (x STE) when they were measured.

    python benchmarks/step_time.py                       # all methods, a table
    python benchmarks/step_time.py --steps 5 --repeats 2 --methods ste lstmfc
    python benchmarks/step_time.py --device cuda --json  # {method: {seconds_per_step, x_fp, x_ste, peak_mb}}

Options ``--compile`` (the model wrapped in ``torch.compile`` for the closure's forward pass) and ``--amp bf16``
(the closure under ``torch.autocast`` in bfloat16) measure those settings as well.

On a CPU shared with other work, OpenMP threads spin while they wait for each other and wall-clock times swing
by 2x or more from one run to the next (methods made of many small operations, LSTMFC's step, the most).
``OMP_WAIT_POLICY=PASSIVE python benchmarks/step_time.py ...`` (the children inherit it) removes most of that;
``--threads 1 --cpu-time`` (seconds of CPU time per step, one thread) gives the steadiest ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

METHODS = ("fp", "ste", "fc-grad", "multifc", "lstmfc", "lstmfc-16", "ste-kd")
WARMUP_STEPS = 3


def _build(method: str, device: str, compile_model: bool, amp: str) -> tuple[Any, Any, Any]:
    """(model, step function, forward module) of ``method``, on ``device``, in the library's default layout."""
    import torch
    import torch.nn.functional as F

    import metaquant as mq

    torch.manual_seed(0)
    model = mq.models.resnet20(num_classes=10)
    if method != "fp":
        mq.quantize_(model, mq.QuantConfig("dorefa", 1))
    model.to(device)
    fmt = mq.layout.preferred_memory_format(model)
    mq.layout.apply_memory_format(model, fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compile_model else model
    metas = {
        "fc-grad": lambda: mq.FCGrad(hidden=100),
        "multifc": lambda: mq.MultiFC(hidden=100),
        "lstmfc": lambda: mq.LSTMFC(hidden=100),
        "lstmfc-16": lambda: mq.LSTMFC(hidden=16),
    }
    if method == "fp":

        def step(closure):
            opt.zero_grad(set_to_none=True)
            loss = closure()
            loss.backward()
            opt.step()
            return loss.detach()
    elif method in ("ste", "ste-kd"):
        step = mq.Trainer(model, opt).step
    else:
        step = mq.MetaQuant(model, opt, meta=metas[method](), meta_lr=1e-3).step

    criterion = lambda logits, y, x: F.cross_entropy(logits, y)  # noqa: E731
    if method == "ste-kd":
        teacher = mq.models.resnet20(num_classes=10).to(device)
        mq.layout.apply_memory_format(teacher, fmt)
        criterion = mq.Distillation(teacher, weight=0.9, temperature=4.0)

    def loss_fn(x, y):
        if amp == "bf16":
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
                logits = forward(x)
            return criterion(logits.float(), y, x)
        return criterion(forward(x), y, x)

    return fmt, step, loss_fn


def child(
    method: str,
    steps: int,
    batch_size: int,
    device: str,
    compile_model: bool,
    amp: str,
    threads: int | None = None,
    cpu_time: bool = False,
) -> dict[str, float]:
    """Warm up, then time ``steps`` steps of ``method`` in this process; its peak memory in MB."""
    import torch

    import metaquant as mq

    if threads:
        torch.set_num_threads(threads)

    fmt, step, loss_fn = _build(method, device, compile_model, amp)
    x = mq.layout.format_batch(torch.randn(batch_size, 3, 32, 32, device=device), fmt)
    y = torch.randint(0, 10, (batch_size,), device=device)
    closure = lambda: loss_fn(x, y)  # noqa: E731
    cuda = torch.device(device).type == "cuda"
    for _ in range(WARMUP_STEPS):  # MetaQuant's first step is the plain one of iteration 0
        step(closure)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = time.process_time if cpu_time else time.perf_counter
    start = clock()
    for _ in range(steps):
        step(closure)
    if cuda:
        torch.cuda.synchronize()
    seconds = (clock() - start) / steps
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"seconds_per_step": seconds, "peak_mb": peak_mb}


def run(args: argparse.Namespace) -> dict[str, dict[str, float | None]]:
    """Every method in a child process, ``args.repeats`` rounds; the fastest round's time, the smallest peak."""
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for method in args.methods:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--device",
                args.device,
                "--amp",
                args.amp,
            ]
            if args.compile:
                cmd.append("--compile")
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.cpu_time:
                cmd.append("--cpu-time")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if method not in best:
                best[method] = r
            else:
                best[method] = {
                    "seconds_per_step": min(best[method]["seconds_per_step"], r["seconds_per_step"]),
                    "peak_mb": min(best[method]["peak_mb"], r["peak_mb"]),
                }
    fp, ste = best.get("fp"), best.get("ste")
    results: dict[str, dict[str, float | None]] = {}
    for method, r in best.items():
        s = r["seconds_per_step"]
        results[method] = {
            "seconds_per_step": s,
            "x_fp": s / fp["seconds_per_step"] if fp else None,
            "x_ste": s / ste["seconds_per_step"] if ste else None,
            "peak_mb": r["peak_mb"],
        }
    return results


def table(results: dict[str, dict[str, float | None]], args: argparse.Namespace) -> str:
    ste = results.get("ste")

    def ratio(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    settings = ", ".join(
        [f"ResNet20, 1-bit DoReFa, batch {args.batch_size}, channels-last, {args.steps} timed steps on {args.device}"]
        + (["torch.compile"] if args.compile else [])
        + ([f"autocast {args.amp}"] if args.amp != "none" else [])
        + ([f"{args.threads} thread(s)"] if args.threads else [])
        + (["CPU time"] if args.cpu_time else [])
        + [f"fastest of {args.repeats} round(s)"]
    )
    mem = "peak CUDA MB" if args.device.startswith("cuda") else "peak RSS MB"
    lines = [settings, f"{'method':<10} {'s/step':>8} {'x fp':>6} {'x STE':>6} {mem:>13} {'x STE':>6}"]
    for method, r in results.items():
        mem_ratio = r["peak_mb"] / ste["peak_mb"] if ste else None
        lines.append(
            f"{method:<10} {r['seconds_per_step']:>8.3f} {ratio(r['x_fp']):>6} {ratio(r['x_ste']):>6} "
            f"{r['peak_mb']:>13.0f} {ratio(mem_ratio):>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per child (default 10)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds over all methods; the fastest counts (default 2)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--compile", action="store_true", help="run the forward pass through torch.compile")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast the forward pass")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads in each child (default: torch's); 1 is the steadiest on a busy machine",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="measure the process's CPU time instead of wall-clock time (with --threads 1: the work "
        "done, whatever else the machine runs)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.batch_size < 1:
        parser.error("--steps, --repeats and --batch-size must be >= 1")
    if args.cpu_time and args.device.startswith("cuda"):
        parser.error("--cpu-time measures CPU work; on CUDA the wall-clock time is the measure")
    if args.child:
        print(
            json.dumps(
                child(
                    args.child,
                    args.steps,
                    args.batch_size,
                    args.device,
                    args.compile,
                    args.amp,
                    args.threads,
                    args.cpu_time,
                )
            )
        )
        return
    results = run(args)
    print(json.dumps(results) if args.json else table(results, args))


if __name__ == "__main__":
    main()
