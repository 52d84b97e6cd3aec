"""An exported network with quantized activations in onnxruntime: its default options against ``onnx_session_options``.

What is measured: ResNet20 (``mq.models.resnet20(num_classes=10, in_channels=1)``) quantized with
``--weights``/``--weight-bits`` and LSQ activations of ``--act-bits``, trained ``--steps`` steps (SGD, lr 0.05,
momentum 0.9, batch 64) on Fashion-MNIST, then exported by ``mq.export.export_onnx`` and run on ``--test-size``
test images in two onnxruntime sessions (CPU provider, ``--threads`` intra-op threads):

* ``default``  onnxruntime's default options: it rewrites ``DequantizeLinear → Conv/Gemm → QuantizeLinear`` for
               integer arithmetic (the float bias rounded to int32 at ``s_x·s_w``; ``QLinearConv`` where it has an
               integer kernel for the types), so its logits differ from the model's by that rounding;
* ``options``  ``mq.export.onnx_session_options()`` (what ``metaquant eval`` uses): computed in float as the
               model computes.

For each: the share of top-1 predictions equal to the model's, the largest and median absolute logit difference,
the rows off by more than ``1e-5·max|logit|``, and the time per batch of 100 images (fastest of 5).

    python benchmarks/onnx_activations.py --json
    python benchmarks/onnx_activations.py --weights uniform --weight-bits 8 --act-bits 8 --steps 100 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F

import metaquant as mq
import metaquant.export
from metaquant.data import make_loaders


def _trained_model(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The trained model (eval mode) and the test images."""
    torch.manual_seed(0)
    train, test, _ = make_loaders(
        "fashion-mnist", batch_size=64, data_dir=args.data_dir, train_size=64 * args.steps, test_size=args.test_size
    )
    model = mq.models.resnet20(num_classes=10, in_channels=1)
    mq.quantize_(
        model, mq.QuantConfig(args.weights, args.weight_bits, activations=mq.ActQuantConfig("lsq", args.act_bits))
    )
    trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    model.train()
    for x, y in train:
        trainer.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    return model.eval(), torch.cat([x for x, _ in test])


def _time(session: Any, batch: np.ndarray) -> float:
    name = session.get_inputs()[0].name
    session.run(None, {name: batch})  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, {name: batch})
        times.append(time.perf_counter() - start)
    return min(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:  # removed whatever happens
        return _run(args, Path(folder) / "model.onnx")


def _run(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    model, images = _trained_model(args)
    with torch.no_grad():
        reference = model(images).numpy()
    mq.export.export_onnx(model, path, images[:2])
    results: dict[str, Any] = {}
    for name, options in (("default", onnxruntime.SessionOptions()), ("options", mq.export.onnx_session_options())):
        options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        chunks = [session.run(None, {feed: images[i : i + 100].numpy()})[0] for i in range(0, len(images), 100)]
        logits = np.concatenate(chunks)
        diff = np.abs(logits - reference)
        results[name] = {
            "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "max_abs_difference": float(diff.max()),
            "median_abs_difference": float(np.median(diff)),
            "rows_beyond_1e-5_of_max_logit": int((diff.max(1) > 1e-5 * np.abs(reference).max()).sum()),
            "ms_per_100_images": 1000 * _time(session, images[:100].numpy()),
        }
    results["max_abs_logit"] = float(np.abs(reference).max())
    results["settings"] = (
        f"W{args.weight_bits} {args.weights} / A{args.act_bits} lsq, {args.steps} steps, {len(images)} test images, "
        f"{args.threads} thread(s), onnxruntime {onnxruntime.__version__}, torch {torch.__version__}"
    )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="lsq", help="the weight quantizer (default lsq)")
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200, help="training steps of batch 64 (default 200)")
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime's intra-op threads (default 1)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST's folder (default: the data's usual places)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    results = run(args)
    if args.json:
        print(json.dumps(results))
        return
    print(results["settings"], f"max |logit| {results['max_abs_logit']:.3g}")
    for name in ("default", "options"):
        r = results[name]
        print(
            f"{name:<8} top-1 agreement {r['top1_agreement']:.3f}, "
            f"|logit difference| max {r['max_abs_difference']:.3g} median {r['median_abs_difference']:.3g}, "
            f"rows beyond 1e-5·max {r['rows_beyond_1e-5_of_max_logit']}, "
            f"{r['ms_per_100_images']:.1f} ms per 100 images"
        )


if __name__ == "__main__":
    main()
