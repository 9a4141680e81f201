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
