"""Time and peak memory of one training step: MetaQuant (each meta quantizer) against STE.

ResNet20 with 1-bit DoReFa weights on every layer, a CIFAR-sized batch (128 x 3 x 32 x 32), plain SGD: the
paper's setting (it reports 1.34x for MultiFC over STE). Each method runs in its own child process, so that
its peak resident memory is its own; all children run in this one command, one after the other, in rounds
(every method once per round, ``--repeats`` rounds), and each method's time is its fastest round, which
removes most of the drift of a shared machine. Ratios are taken against STE.

    python benchmarks/step_time.py [--steps 10] [--repeats 2] [--batch-size 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = ("ste", "fc-grad", "multifc", "lstmfc")


def child(method: str, steps: int, batch_size: int, device: str) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    import metaquant as mq
    from metaquant.pipeline import build_meta
    from metaquant.config import RunConfig

    torch.manual_seed(0)
    model = mq.quantize_(mq.models.resnet20(num_classes=10), mq.QuantConfig("dorefa", 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if method == "ste":
        trainer = mq.Trainer(model, opt)
    else:
        trainer = mq.MetaQuant(model, opt, build_meta(RunConfig(estimator=method)), meta_lr=1e-3)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):  # warm-up; MetaQuant's first step is the plain one of iteration 0
        trainer.step(closure)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(closure)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    result = {
        "seconds_per_step": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_training_mb": rss_before / 1024,
    }
    if device.startswith("cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all methods; the fastest counts")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch_size, args.device)))
        return
    results: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for method in args.methods:
            out = subprocess.run(
                [sys.executable, __file__, "--child", method, "--steps", str(args.steps),
                 "--batch-size", str(args.batch_size), "--device", args.device],
                check=True, capture_output=True, text=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if method not in results or r["seconds_per_step"] < results[method]["seconds_per_step"]:
                results[method] = r
    base = results.get("ste") or next(iter(results.values()))
    mem_key = "peak_cuda_mb" if "peak_cuda_mb" in base else "peak_rss_mb"
    print(f"ResNet20, 1-bit DoReFa, batch {args.batch_size}, {args.steps} timed steps on {args.device}, "
          f"fastest of {args.repeats} rounds")
    print(f"{'method':<10} {'s/step':>8} {'x STE':>7} {mem_key:>14} {'x STE':>7}")
    for method, r in results.items():
        print(f"{method:<10} {r['seconds_per_step']:>8.3f} {r['seconds_per_step'] / base['seconds_per_step']:>7.2f} "
              f"{r[mem_key]:>14.0f} {r[mem_key] / base[mem_key]:>7.2f}")


if __name__ == "__main__":
    main()
