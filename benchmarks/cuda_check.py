"""The CUDA path, checked and timed in one command: what to run on a GPU machine.

Four checks, each against an independent reference, then the timings:

1. **CUDA = CPU.** Five steps of STE, FC-Grad, MultiFC and LSTMFC (ResNet8, 1-bit DoReFa, a fixed batch) on the
   GPU and on the CPU from the same weights: the losses agree to 1e-3 relative and the latent weights to 1e-3
   (float32 on both; TF32 turned off, so the GPU's matrix products are float32 too).
2. **Mixed precision.** bf16 autocast and fp16 with a gradient scaler (``mq.precision``) train MetaQuant on a
   small task: the loss goes down, and the latent weights and meta quantizer stay float32.
3. **torch.compile.** The model under ``torch.compile`` (Inductor, the default backend) trains with MetaQuant: its
   losses equal the eager model's to 1e-3 and dynamo compiles no new graph after warm-up.
4. **Timings.** ``benchmarks/step_time.py --device cuda --json`` (each method in its own process), then one full
   Fashion-MNIST epoch (60,000 images, batch 128, then the 10,000 test images) of ResNet20 for STE and MultiFC
   through the command line (``metaquant quantize -n 1 --device cuda``), timed from the run's own metrics.

    PYTHONPATH=src python benchmarks/cuda_check.py --data-dir DIR_WITH_FASHION_MNIST --out results/

The last lines it prints are a summary; ``--out`` also receives ``cuda_check.json`` with every figure. It exits
non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import metaquant as mq

HERE = Path(__file__).resolve().parent


def _metas() -> dict[str, Any]:
    # the paper's random start: every layer of φ has a gradient from the first step, so all of it is compared
    return {
        "ste": None,
        "fc-grad": lambda: mq.FCGrad(hidden=100, init_scheme="paper"),
        "multifc": lambda: mq.MultiFC(hidden=100, init_scheme="paper"),
        "lstmfc": lambda: mq.LSTMFC(hidden=100, init_scheme="paper"),
    }


def _train(
    method: str,
    device: str,
    steps: int,
    *,
    amp: str = "none",
    compile_model: bool = False,
    lr: float = 1e-2,
) -> tuple[list[float], torch.nn.Module, Any]:
    """``steps`` steps of ``method`` on one fixed batch; (losses, model, stepper), all seeded identically."""
    torch.manual_seed(0)
    model = mq.models.resnet8(num_classes=10)
    mq.quantize_(model, mq.QuantConfig("dorefa", 1))
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    model.to(device)
    x, y = x.to(device), y.to(device)
    fmt = mq.layout.preferred_memory_format(model)
    mq.layout.apply_memory_format(model, fmt)
    x = mq.layout.format_batch(x, fmt)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scaler = mq.precision.make_grad_scaler(amp, device)
    meta = _metas()[method]
    if meta is None:
        stepper: Any = mq.Trainer(model, opt, grad_scaler=scaler)
    else:
        torch.manual_seed(1)
        stepper = mq.MetaQuant(model, opt, meta=meta(), meta_lr=1e-3, grad_scaler=scaler)
    forward = torch.compile(model) if compile_model else model

    def closure() -> torch.Tensor:
        with mq.precision.autocast(amp, device):
            return F.cross_entropy(forward(x), y)

    losses = [float(stepper.step(closure)) for _ in range(steps)]
    return losses, model, stepper


def _latents(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().float().cpu() for p in model.parameters()]


def check_parity(report: dict[str, Any], device: str) -> bool:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ok = True
    for method in _metas():
        cpu_losses, cpu_model, _ = _train(method, "cpu", 5)
        gpu_losses, gpu_model, _ = _train(method, device, 5)
        loss_err = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(cpu_losses, gpu_losses))
        weight_err = max(
            float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(_latents(gpu_model), _latents(cpu_model))
        )
        passed = loss_err < 1e-3 and weight_err < 1e-3
        ok &= passed
        report["parity"][method] = {"loss_rel_err": loss_err, "weight_rel_err": weight_err, "passed": passed}
        print(f"parity {method:8s} loss rel err {loss_err:.2e}  weight rel err {weight_err:.2e}  {_verdict(passed)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return ok


def check_amp(report: dict[str, Any], device: str) -> bool:
    ok = True
    for amp in ("bf16", "fp16") if device.startswith("cuda") else ("bf16",):
        for method in ("ste", "multifc"):
            losses, model, stepper = _train(method, device, 30, amp=amp, lr=5e-2)
            meta_params = list(stepper.meta.parameters()) if method != "ste" else []
            float32 = all(p.dtype == torch.float32 for p in list(model.parameters()) + meta_params)
            first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
            passed = float32 and last < first and all(map(_finite, losses))
            ok &= passed
            report["amp"][f"{amp}/{method}"] = {"first": first, "last": last, "float32": float32, "passed": passed}
            print(
                f"amp {amp} {method:8s} loss {first:.3f} -> {last:.3f}  float32 weights {float32}  {_verdict(passed)}"
            )
    return ok


def check_compile(report: dict[str, Any], device: str) -> bool:
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager, _, _ = _train("multifc", device, 8)
    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    compiled, _, _ = _train("multifc", device, 4, compile_model=True)
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    dynamo.reset()
    counters.clear()
    compiled, _, _ = _train("multifc", device, 8, compile_model=True)
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    err = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
    passed = err < 1e-3 and breaks == 0 and graphs == graphs_after_warmup
    report["compile"] = {
        "loss_rel_err": err,
        "graph_breaks": breaks,
        "graphs_after_4_steps": graphs_after_warmup,
        "graphs_after_8_steps": graphs,
        "passed": passed,
    }
    print(
        f"compile multifc loss rel err {err:.2e}  graph breaks {breaks}  graphs {graphs_after_warmup} -> {graphs}  "
        f"{_verdict(passed)}"
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return passed


def step_times(report: dict[str, Any], args: argparse.Namespace) -> None:
    """``step_time.py`` on the device: every method in float32, and fp, STE and MultiFC under bf16 autocast."""
    cmd = [sys.executable, str(HERE / "step_time.py"), "--device", args.device, "--json"]
    cmd += ["--steps", str(args.steps), "--repeats", str(args.repeats)]
    for amp, methods in (
        ("none", ["fp", "ste", "fc-grad", "multifc", "lstmfc", "lstmfc-16"]),
        ("bf16", ["fp", "ste", "multifc"]),
    ):
        proc = subprocess.run(cmd + ["--amp", amp, "--methods", *methods], capture_output=True, text=True, check=True)
        report["step_time"][amp] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"step_time.py --device {args.device} --amp {amp} --steps {args.steps} --repeats {args.repeats}:")
        print(proc.stdout.strip().splitlines()[-1])


def epochs(report: dict[str, Any], args: argparse.Namespace) -> None:
    from metaquant.experiments.cli import main as cli

    with tempfile.TemporaryDirectory() as runs:
        for method in ("ste", "multifc"):
            argv = ["quantize", "-d", "fashion-mnist", "--no-download", "-n", "1", "-meta", method]
            argv += ["--device", args.device, "--no-progress", "--run-dir", runs, "--name", method, "--lr", "1e-3"]
            if args.data_dir:
                argv += ["--data-dir", args.data_dir]
            start = time.perf_counter()
            code = cli(argv)
            wall = time.perf_counter() - start
            if code != 0:
                raise SystemExit(f"metaquant {' '.join(argv)} exited {code}")
            metrics = json.loads((Path(runs) / method / "metrics.jsonl").read_text().splitlines()[-1])
            report["epoch"][method] = {
                "train_seconds": metrics["train_seconds"],
                "command_seconds": wall,
                "test_acc": metrics["test_acc"],
                "command": "metaquant " + " ".join(argv),
            }
            print(
                f"epoch {method:8s} train {metrics['train_seconds']:.1f} s, whole command {wall:.1f} s, "
                f"test acc {metrics['test_acc']:.2f}"
            )
    ste, multi = report["epoch"]["ste"], report["epoch"]["multifc"]
    report["epoch"]["multifc_x_ste"] = multi["train_seconds"] / ste["train_seconds"]


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _verdict(passed: bool) -> str:
    return "ok" if passed else "FAILED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="where the Fashion-MNIST IDX files are")
    parser.add_argument("--out", default=".", help="folder for cuda_check.json (default: the current folder)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per method in step_time.py")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of step_time.py")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the script")
    parser.add_argument("--skip", nargs="*", default=[], choices=("parity", "amp", "compile", "time", "epoch"))
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the CUDA path (--device cpu for a dry run)")
    name = torch.cuda.get_device_properties(args.device).name if cuda else "cpu"
    report: dict[str, Any] = {
        "gpu": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "parity": {},
        "amp": {},
        "step_time": {},
        "epoch": {},
    }
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    ok = True

    def save() -> None:  # after every section: a run stopped by its time limit keeps what it measured
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "cuda_check.json").write_text(json.dumps(report, indent=2))

    sections = (
        ("parity", check_parity),
        ("amp", check_amp),
        ("time", lambda r, d: step_times(r, args)),
        ("epoch", lambda r, d: epochs(r, args)),
        ("compile", check_compile),
    )
    for name, section in sections:
        if name in args.skip:
            continue
        try:
            ok &= section(report, args.device) is not False
        except Exception as error:  # one failing section must not hide the others' results
            ok = False
            report[name] = {"error": repr(error)}
            print(f"{name} FAILED: {error!r}")
        save()
    print("summary:", json.dumps({k: report[k] for k in ("gpu", "epoch")}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
