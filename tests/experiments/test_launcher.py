"""The ``metaquant`` command as a process: help without torch, Ctrl-C at any moment, one sweep per folder."""

import os
import signal
import subprocess
import sys
import time

import pytest

import metaquant
from metaquant.experiments.cli import build_parser, main

# what the console script runs; says on stderr, at the end, whether torch was imported
LAUNCH = (
    "import sys\nfrom metaquant_launcher import main\ntry:\n    main()\n"
    "finally:\n    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)"
)


def _launch(*args, **kwargs):
    env = {**os.environ, "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


@pytest.mark.parametrize("command", [None, "sweep", "report", "plot", "eval"])
def test_help_is_the_full_command_lines_and_needs_no_torch(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = build_parser()
    expected = (parser.commands[command] if command else parser).format_help()
    out, err = _launch(*([command] if command else []), "--help").communicate(timeout=60)
    assert out == expected and err.splitlines()[-1] == "torch imported: False"


def test_version_needs_no_torch_and_other_commands_help_comes_from_the_library(monkeypatch):
    out, err = _launch("--version").communicate(timeout=60)
    assert out == f"metaquant {metaquant.__version__}\n" and err.splitlines()[-1] == "torch imported: False"
    monkeypatch.setenv("COLUMNS", "100")
    out, err = _launch("quantize", "--help").communicate(timeout=120)
    assert out == build_parser().commands["quantize"].format_help() and "--estimator" in out
    assert err.splitlines()[-1] == "torch imported: True"


def _quiet_interrupt(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in err.splitlines() if not line.startswith("torch imported")]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert lines and lines[-1].startswith("metaquant: "), err
    return lines


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seconds", [0.3, 1.0, 2.0, 3.5, 5.0])
def test_ctrl_c_at_any_moment_of_a_run_exits_130_with_one_line(seconds, tmp_path, tiny_mnist):
    """SIGINT while the library is imported, the options parsed, the data read, the model built, or the run
    trains: status 130 and a line on stderr, never a traceback."""
    args = ["quantize", *tiny_mnist, "-m", "resnet8", "-bs", "32", "-n", "500", "--no-progress"]
    proc = _launch(*args, "--run-dir", str(tmp_path))
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    _quiet_interrupt(proc)


def _tiny_sweep(tmp_path, tiny_mnist, trials, epochs):
    data_dir = tiny_mnist[tiny_mnist.index("--data-dir") + 1]
    path = tmp_path / "sweep.toml"
    path.write_text(
        f'name = "tiny"\ntrials = {trials}\n[base]\ndataset = "mnist"\ndata_dir = "{data_dir}"\ndownload = false\n'
        f'model = "resnet8"\nbatch_size = 32\nepochs = {epochs}\ndevice = "cpu"\n[[grid]]\nestimator = "ste"\n'
    )
    return path


@pytest.mark.timeout(300)
def test_ctrl_c_while_a_sweeps_processes_start_exits_130_with_no_traceback_from_any(tmp_path, tiny_mnist):
    """Ctrl-C reaches every process of the terminal's group, the runs that are still importing torch too."""
    sweep, root = _tiny_sweep(tmp_path, tiny_mnist, trials=2, epochs=50), tmp_path / "runs"
    proc = _launch("sweep", str(sweep), "--run-dir", str(root), "--jobs", "2", start_new_session=True)
    deadline = time.monotonic() + 120
    while not root.exists():  # the sweep has planned its runs and starts their processes
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _quiet_interrupt(proc)


@pytest.mark.timeout(300)
def test_a_second_sweep_on_a_folder_in_use_is_refused_before_it_starts_anything(tmp_path, tiny_mnist, capsys):
    sweep, root = _tiny_sweep(tmp_path, tiny_mnist, trials=1, epochs=50), tmp_path / "runs"
    proc = _launch("sweep", str(sweep), "--run-dir", str(root))
    try:
        deadline = time.monotonic() + 120
        while not list(root.glob("*/metrics.jsonl")):  # the first sweep is training
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        capsys.readouterr()
        assert main(["sweep", str(sweep), "--run-dir", str(root), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err == (
            f"metaquant: error: sweep folder {root} is in use by another process (pid {proc.pid}); wait until it "
            "ends, or stop it first\n"
        )
        assert proc.poll() is None  # the first sweep goes on
    finally:
        proc.kill()
        proc.communicate()


def test_sweep_takes_no_progress_as_the_other_commands_do(tmp_path, tiny_mnist, capsys):
    sweep = _tiny_sweep(tmp_path, tiny_mnist, trials=1, epochs=1)
    assert main(["sweep", str(sweep), "--run-dir", str(tmp_path / "runs"), "--no-progress", "--dry-run"]) == 0
    assert "(to run)" in capsys.readouterr().out
    assert main(["sweep", str(sweep), "--progress", "--no-progress"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
