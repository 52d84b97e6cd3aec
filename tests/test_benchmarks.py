"""The benchmark scripts run and report what their docstrings promise (tiny sizes: a smoke test, not a timing)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from metaquant.experiments import allocator

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def reuse_possible() -> bool:
    """Whether the program's allocator settings apply here: glibc, and an environment that sets none of them."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    chosen = any(n in os.environ for n in allocator.USER_SETTINGS) or any(
        t in tunables for t in allocator.USER_TUNABLES
    )
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not chosen


def _run_json(script, *args):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--json"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # exactly one JSON object on stdout


def test_step_time_reports_both_layouts_of_every_method_against_the_plain_step():
    out = _run_json(
        "step_time.py",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--batch-size",
        "4",
        "--methods",
        "fp",
        "ste",
        "multifc",
        "lstmfc-16",
        "ste-kd",
        "--memory",
    )
    methods = out["methods"]
    assert list(methods) == ["fp", "ste", "multifc", "lstmfc-16", "ste-kd"]
    plain = {layout: r["seconds_per_step"] for layout, r in methods["fp"].items()}
    assert set(plain) == {"python", "cli"}
    assert out["limit"] == {"layout": min(plain, key=plain.get), "seconds_per_step": min(plain.values())}
    for method, layouts in methods.items():
        assert set(layouts) == {"python", "cli"}, method
        for layout, r in layouts.items():
            assert set(r) == {"seconds_per_step", "x_limit", "x_ste", "peak_mb"}, (method, layout)
            assert r["seconds_per_step"] > 0 and r["peak_mb"] > 0
            assert abs(r["x_limit"] - r["seconds_per_step"] / min(plain.values())) < 1e-12
            assert abs(r["x_ste"] - r["seconds_per_step"] / methods["ste"][layout]["seconds_per_step"]) < 1e-12
    assert min(r["x_limit"] for r in methods["fp"].values()) == 1.0
    # the cli layout runs with the program's allocator settings, where glibc's are there to set
    assert out["freed_memory_reused"] == (["cli"] if reuse_possible() else [])
    assert ("freed memory reused in the cli layout" in out["settings"]) == reuse_possible()


def test_lstmfc_time_compares_the_fused_step_with_nn_lstm():
    out = _run_json(
        "lstmfc_time.py", "--n", "2000", "--hidden", "8", "--rounds", "1", "--variants", "rows=512,keep=0", "keep=1"
    )
    assert list(out) == ["nn.LSTM", "fused", "fused rows=512,keep=0", "fused keep=1"]
    assert out["nn.LSTM"]["x_nn_lstm"] == 1.0
    for r in out.values():
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0


def test_step_profile_counts_the_operators_of_each_method():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_profile.py"), "--methods", "fp", "ste", "--steps", "1"]
        + ["--batch-size", "2", "--top", "3"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    heads = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    # "== fp: per step 0 device kernels, 0 launch calls, 1206 aten ops; waits per step: none"
    counts = {line.split(":")[0][3:]: int(line.split(", ")[2].split(" aten")[0]) for line in heads}
    assert list(counts) == ["fp", "ste"]
    assert counts["ste"] > counts["fp"] > 0  # the quantizer adds operators to the same network's step


def test_cuda_check_runs_its_checks_on_the_cpu_and_refuses_cuda_without_a_device(tmp_path):
    script = str(BENCHMARKS / "cuda_check.py")
    proc = subprocess.run(
        [
            sys.executable,
            script,
            "--device",
            "cpu",
            "--skip",
            "amp",
            "time",
            "epoch",
            "compile",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "cuda_check.json").read_text())
    assert set(report["parity"]) == {"ste", "fc-grad", "multifc", "lstmfc"}
    assert all(r["passed"] and r["loss_rel_err"] == 0.0 for r in report["parity"].values())  # CPU against CPU
    import torch

    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_onnx_inference_compares_the_1_bit_model_with_the_float_one():
    out = _run_json("onnx_inference.py", "--batch-size", "4", "--runs", "1", "--repeats", "1", "--rounds", "1")
    models = out["models"]
    assert list(models) == ["float", "1-bit", "1-bit default"]
    assert all(r["ms_per_batch"] > 0 and r["bytes"] > 0 for r in models.values())
    assert out["speed_vs_float"] == models["float"]["ms_per_batch"] / models["1-bit"]["ms_per_batch"]
    assert out["size_ratio"] == models["float"]["bytes"] / models["1-bit"]["bytes"] > 4
    assert out["max_logit_difference"] < 1e-3  # the same network: the weights decoded to float


def test_onnx_activations_compares_the_default_session_with_the_options_on_a_trained_model():
    out = _run_json("onnx_activations.py", "--steps", "2", "--test-size", "100", "--act-bits", "8")
    for name in ("default", "options"):
        r = out[name]
        assert 0 <= r["top1_agreement"] <= 1 and r["ms_per_100_images"] > 0
        assert 0 <= r["median_abs_difference"] <= r["max_abs_difference"]
        assert 0 <= r["rows_beyond_1e-5_of_max_logit"] <= 100
    assert out["options"]["top1_agreement"] >= 0.95  # computed in float as the model computes
    assert out["max_abs_logit"] > 0 and "W4 lsq / A8 lsq, 2 steps, 100 test images" in out["settings"]


def test_gpu_step_times_the_one_pass_quantizer_against_one_pass_per_weight():
    out = _run_json(
        "gpu_step.py", "--device", "cpu", "--steps", "1", "--repeats", "1", "--skip", "graphs", "compiled", "epoch"
    )
    assert set(out) == {"device", "torch", "quantizer"}
    q = out["quantizer"]
    assert q["speedup"] == q["per_layer"]["seconds"] / q["one_pass"]["seconds"]
    assert 0 < q["one_pass"]["kernels"] < q["per_layer"]["kernels"]  # one pass per shared quantizer, not per weight
