"""Inference of the exported 1-bit ResNet20 in onnxruntime against the same network with float weights.

What is measured: ResNet20 (``mq.models.resnet20(num_classes=10)``) with 1-bit DoReFa weights on every layer,
exported by ``mq.export.export_onnx`` (QDQ: integer weights and ``DequantizeLinear``, BatchNorm folded), and the
same network with its weights decoded to float (``mq.export.materialize``), exported the same way; batches of
``--batch-size`` (256) x 3 x 32 x 32, ``--threads`` (1) intra-op threads, onnxruntime's CPU provider. Each model
is timed in rounds (``--repeats``, each ``--runs`` batches after a warm-up); a time is the fastest round's mean.

* ``float``          the float model, onnxruntime's default options;
* ``1-bit``          the QDQ model with the options a deployer should set, ``mq.export.onnx_session_options``
                     (what ``metaquant eval`` uses): ``session.disable_quant_qdq = 1`` makes onnxruntime fold each
                     weight's ``DequantizeLinear`` into a float constant when the session is created, so the
                     network runs as the float one does; the file keeps the integer weights;
* ``1-bit default``  the QDQ model with onnxruntime's default options, which keep ``DequantizeLinear`` in the
                     graph and run it at every inference.

``speed_vs_float`` is the float model's time over the 1-bit model's (>= 1: at least as fast); ``size_ratio``
the float file's size over the 1-bit file's.

    python benchmarks/onnx_inference.py --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

import metaquant as mq
import metaquant.export


def _time(session: Any, batch: np.ndarray, args: argparse.Namespace) -> float:
    name = session.get_inputs()[0].name
    session.run(None, {name: batch})  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.runs):
            session.run(None, {name: batch})
        best = min(best, (time.perf_counter() - start) / args.runs)
    return best


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:  # removed whatever happens
        return _run(args, Path(folder))


def _run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = mq.quantize_(mq.models.resnet20(num_classes=10), mq.QuantConfig("dorefa", 1)).eval()
    example = torch.zeros(2, 3, 32, 32)
    files = {"1-bit": folder / "one-bit.onnx", "float": folder / "float.onnx"}
    mq.export.export_onnx(model, files["1-bit"], example)
    mq.export.export_onnx(mq.export.materialize(model), files["float"], example)
    batch = np.random.default_rng(0).standard_normal((args.batch_size, 3, 32, 32), dtype=np.float32)

    def session(path: Path, options: onnxruntime.SessionOptions) -> Any:
        options.intra_op_num_threads = args.threads
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    sessions = {
        "float": session(files["float"], onnxruntime.SessionOptions()),
        "1-bit": session(files["1-bit"], mq.export.onnx_session_options()),
        "1-bit default": session(files["1-bit"], onnxruntime.SessionOptions()),
    }
    name = sessions["float"].get_inputs()[0].name
    outputs = {k: s.run(None, {name: batch[:8]})[0] for k, s in sessions.items()}
    seconds = {k: float("inf") for k in sessions}
    for _ in range(args.rounds):  # interleaved: drift of a shared machine hits every model alike
        for k, s in sessions.items():
            seconds[k] = min(seconds[k], _time(s, batch, args))
    sizes = {"float": files["float"].stat().st_size, "1-bit": files["1-bit"].stat().st_size}
    sizes["1-bit default"] = sizes["1-bit"]
    return {
        "models": {k: {"ms_per_batch": 1000 * seconds[k], "bytes": sizes[k]} for k in sessions},
        "speed_vs_float": seconds["float"] / seconds["1-bit"],
        "speed_vs_float_default_options": seconds["float"] / seconds["1-bit default"],
        "size_ratio": sizes["float"] / sizes["1-bit"],
        "max_logit_difference": float(np.abs(outputs["1-bit"] - outputs["float"]).max()),
        "settings": f"batch {args.batch_size}, {args.threads} thread(s), fastest of {args.rounds} round(s) of "
        f"{args.repeats} x {args.runs} runs, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime's intra-op threads (default 1)")
    parser.add_argument("--runs", type=int, default=5, help="batches per timing (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per round (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the models (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    results = run(args)
    if args.json:
        print(json.dumps(results))
        return
    print(results["settings"])
    for k, r in results["models"].items():
        print(f"{k:<14} {r['ms_per_batch']:>9.2f} ms/batch {r['bytes'] / 1024:>9.1f} KiB")
    print(
        f"1-bit speed vs float: {results['speed_vs_float']:.2f}x (default options: "
        f"{results['speed_vs_float_default_options']:.2f}x); float size / 1-bit size: {results['size_ratio']:.2f}"
    )


if __name__ == "__main__":
    main()
