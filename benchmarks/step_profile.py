"""Where a training step's time goes: kernel launches, host-device synchronizations and the busiest operators.

For each method of ``step_time.py`` (same model, batch and settings, in its ``--layout``), ``torch.profiler`` records
``--steps`` steps after warm-up and this prints, per step: the number of device kernels launched, the number of calls
that make the host wait for the device (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, device-to-host copies,
``aten::item``/``aten::_local_scalar_dense``), and the operators with the most self CPU time. On a GPU, a step that
launches hundreds of small kernels or waits for the device is bound by the host, not by arithmetic.

    python benchmarks/step_profile.py --device cuda --methods fp ste multifc
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from step_time import LAYOUTS, METHODS, WARMUP_STEPS, build
from torch.profiler import ProfilerActivity, profile

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense", "cudaMemcpyAsync")


def profile_method(method: str, args: argparse.Namespace) -> None:
    device, steps, top = args.device, args.steps, args.top
    step = build(method, args.layout, args)
    for _ in range(WARMUP_STEPS):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = Counter(e.name for e in events if e.name in SYNC_EVENTS)
    ops = Counter(e.name for e in events if e.name.startswith("aten::"))
    print(
        f"== {method}: per step {kernels / steps:.0f} device kernels, {launches / steps:.0f} launch calls, "
        f"{sum(ops.values()) / steps:.0f} aten ops; waits per step: "
        + (", ".join(f"{k} {v / steps:.1f}" for k, v in sorted(syncs.items())) or "none")
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=["fp", "ste", "multifc"], choices=METHODS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--top", type=int, default=12, help="operators shown per method")
    parser.add_argument("--layout", default="cli", choices=LAYOUTS, help="as step_time.py (default cli)")
    args = parser.parse_args()
    args.compile, args.amp = False, "none"
    for method in args.methods:
        profile_method(method, args)


if __name__ == "__main__":
    main()
