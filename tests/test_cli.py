"""The installed package, its info() and command line."""

import json
import subprocess
import sys

import torch

import pyfastnn


def test_info_reports_build_and_runtime():
    details = pyfastnn.info()
    assert details["pyfastnn"] == pyfastnn.__version__
    assert details["torch"] == torch.__version__
    assert details["backends"]["cpu"] is True
    assert details["cpu_isa"] in details["cpu_isas_compiled"]
    assert details["threads"] == torch.get_num_threads()


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pyfastnn", *args], capture_output=True, text=True, timeout=300)


def test_cli_info_json():
    result = _run("info", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pyfastnn"] == pyfastnn.__version__


def test_cli_without_command_prints_help():
    result = _run()
    assert result.returncode == 2 and "info" in result.stdout and "bench" in result.stdout


def test_cli_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = _run("bench", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert {r["pass"] for r in data["results"]} == {"fwd", "fwd+bwd"}
    assert all(r["fused_us"] > 0 and r["eager_us"] > 0 for r in data["results"])


def test_cli_demo_runs_the_whole_lesson(tmp_path, mnist_dir):
    """The README's main job (scripts/demo.sh) minus its setup: every section, pictures, fusion."""
    result = _run("demo", "--data", str(mnist_dir), "--out", str(tmp_path), "--mnist-steps", "20")
    assert result.returncode == 0, result.stderr
    for section in ("Perceptron", "XOR from scratch", "SimpleNN on XOR", "Quick benchmark",
                    "Whole-network fusion", "=> FusedMLP", "eval outputs equal: True", "test accuracy after 20 steps"):
        assert section in result.stdout, section
    for picture in ("activations.png", "xor_scratch_loss.png", "mnist/curves.png", "mnist/predictions.png"):
        assert (tmp_path / picture).stat().st_size > 0, picture
