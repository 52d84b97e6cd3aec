"""Time and peak memory of LSTMFC's step alone: the fused cell against the ``nn.LSTM`` path it replaced.

One call of the meta quantizer on ``N`` coordinates (270,896: every quantized weight of ResNet20) from a
random carried state ``(h, c)``, then the backward pass of a scalar of its output to ``φ`` (the LSTM's and the
FC layer's parameters, the state constant): what a MetaQuant step does with ``LSTMFC``. Variants:

* ``nn.LSTM``: the previous implementation, ``fc(act(lstm(w̃, (h, c))))`` with autograd's graph;
* ``fused``: ``LSTMFC.forward`` with its defaults; ``--variants`` adds others, each a comma-separated list of
  options: ``rows=R`` (``chunk_size``; ``rows=all``: the whole of ``N`` in one block) and ``keep=K``
  (``keep_gates``), e.g. ``--variants keep=0 keep=1 rows=65536``.

Times are taken in one process, variant after variant in rounds, and each variant's time is its fastest round
(a shared machine's load comes and goes); ratios are against ``nn.LSTM``. Both the wall-clock time and the
process's CPU time are reported: on a machine shared with other work the CPU time (with one thread,
``OMP_NUM_THREADS=1``) is the steadier measure of the work done. Peak memory is the peak resident set
(``ru_maxrss``) of a child process per variant, less its resident set just before the call: the memory the step
itself needs beyond its inputs and the old state (the new state included).

    python benchmarks/lstmfc_time.py [--n 270896] [--hidden 100] [--rounds 5] [--variants keep=0 keep=1 rows=all]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from metaquant.meta import LSTMFC


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # not Linux: the peak so far
        return _peak_rss_mb()


def options(variant: str, n: int) -> dict:
    """``LSTMFC`` keyword arguments of a variant: ``"default"``, ``"nn.LSTM"`` or e.g. ``"rows=4096,keep=0"``."""
    if variant in ("default", "nn.LSTM"):
        return {}
    kwargs = {}
    for item in variant.split(","):
        key, _, value = item.partition("=")
        if key == "rows":
            kwargs["chunk_size"] = n if value == "all" else int(value)
        elif key == "keep":
            kwargs["keep_gates"] = float(value)
        else:
            raise SystemExit(f"unknown variant option {item!r}: rows=R or keep=K")
    return kwargs


def make(n: int, hidden: int, num_lstm: int, nonlinearity: str, variant: str):
    torch.manual_seed(0)
    meta = LSTMFC(hidden=hidden, num_lstm=num_lstm, nonlinearity=nonlinearity, **options(variant, n))
    g, w = torch.randn(n).mul_(1e-3), torch.rand(n)
    state = (torch.randn(num_lstm, n, hidden).mul_(0.1), torch.randn(num_lstm, n, hidden).mul_(0.1))
    return meta, g, w, state


def old_forward(meta: LSTMFC, g, w, state):
    """The ``nn.LSTM`` implementation LSTMFC had before the fused cell."""
    out, new_state = meta.lstm(w.reshape(1, -1, 1), state)
    return g * meta.fc(meta.activation(out[0])).squeeze(1), new_state


def step(variant: str, meta: LSTMFC, g, w, state, train: bool = True) -> None:
    """One call from ``state`` and, when ``train``, the backward pass of ``out.sum()`` to ``φ``."""
    with torch.set_grad_enabled(train):
        out, _ = old_forward(meta, g, w, state) if variant == "nn.LSTM" else meta(g, w, state)
        if train:
            out.sum().backward()


def variant_name(variant: str) -> str:
    return {"nn.LSTM": "nn.LSTM", "default": "fused"}.get(variant, f"fused {variant}")


def child(args: argparse.Namespace, variant: str) -> dict:
    meta, g, w, state = make(args.n, args.hidden, args.num_lstm, args.nonlinearity, variant)
    before = _current_rss_mb()
    step(variant, meta, g, w, state, train=not args.frozen)
    return {"peak_extra_mb": _peak_rss_mb() - before, "peak_rss_mb": _peak_rss_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=270_896)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--num-lstm", type=int, default=1)
    p.add_argument("--nonlinearity", default="none")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--variants", nargs="*", default=[], help="more fused variants, each 'rows=R' and/or 'keep=K', comma-separated"
    )
    p.add_argument("--frozen", action="store_true", help="forward only, under torch.no_grad (a frozen φ)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args, args.child)))
        return
    variants = ["nn.LSTM", "default", *args.variants]
    for c in args.variants:
        options(c, args.n)  # refuse a bad variant before any work
    # Memory first, while this process is small: Linux carries a parent's peak RSS over into its children.
    mem = {}
    for c in variants:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            c,
            "--n",
            str(args.n),
            "--hidden",
            str(args.hidden),
            "--num-lstm",
            str(args.num_lstm),
            "--nonlinearity",
            args.nonlinearity,
        ]
        out = subprocess.run(cmd + (["--frozen"] if args.frozen else []), check=True, capture_output=True, text=True)
        mem[c] = json.loads(out.stdout.strip().splitlines()[-1])
    setups = {c: make(args.n, args.hidden, args.num_lstm, args.nonlinearity, c) for c in variants}
    best = {c: float("inf") for c in variants}
    best_cpu = dict(best)
    for c in variants:  # warm-up
        step(c, *setups[c], train=not args.frozen)
    for _ in range(args.rounds):
        for c in variants:
            setups[c][0].zero_grad(set_to_none=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            step(c, *setups[c], train=not args.frozen)
            best[c] = min(best[c], time.perf_counter() - start)
            best_cpu[c] = min(best_cpu[c], time.process_time() - start_cpu)
    base_mem = max(mem["nn.LSTM"]["peak_extra_mb"], 1e-9)
    results = {
        variant_name(c): {
            "seconds": best[c],
            "x_nn_lstm": best[c] / best["nn.LSTM"],
            "cpu_seconds": best_cpu[c],
            "cpu_x_nn_lstm": best_cpu[c] / best_cpu["nn.LSTM"],
            **mem[c],
            "extra_mb_x_nn_lstm": mem[c]["peak_extra_mb"] / base_mem,
        }
        for c in variants
    }
    if args.json:
        print(json.dumps(results))
        return
    what = "forward (no grad)" if args.frozen else "forward+backward"
    print(
        f"LSTMFC {what}, N={args.n}, hidden {args.hidden}, {args.num_lstm} layer(s), {args.nonlinearity}, "
        f"{torch.get_num_threads()} thread(s), fastest of {args.rounds} rounds"
    )
    print(
        f"{'variant':<12} {'wall s':>8} {'x nn.LSTM':>9} {'CPU s':>8} {'x nn.LSTM':>9} {'extra MB':>9} "
        f"{'x nn.LSTM':>9} {'peak RSS MB':>11}"
    )
    for name, r in results.items():
        print(
            f"{name:<12} {r['seconds']:>8.3f} {r['x_nn_lstm']:>9.2f} {r['cpu_seconds']:>8.3f} "
            f"{r['cpu_x_nn_lstm']:>9.2f} {r['peak_extra_mb']:>9.0f} {r['extra_mb_x_nn_lstm']:>9.2f} "
            f"{r['peak_rss_mb']:>11.0f}"
        )


if __name__ == "__main__":
    main()
