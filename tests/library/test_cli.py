"""The installed package, its info() and the library's commands (info, bench); the lesson's commands
are tested in tests/lesson/test_commands.py."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyfastnn
from pyfastnn.extras import missing_lesson_requirements
from commands import cli, error_line, run_cli


def test_info_reports_build_and_runtime():
    details = pyfastnn.info()
    assert details["pyfastnn"] == pyfastnn.__version__
    assert details["torch"] == torch.__version__
    assert details["backends"]["cpu"] is True
    assert details["cpu_isa"] in details["cpu_isas_compiled"]
    assert details["threads"] == torch.get_num_threads()


def test_cli_info_json():
    result = run_cli("info", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pyfastnn"] == pyfastnn.__version__


def test_cli_without_command_prints_help():
    result = run_cli()
    assert result.returncode == 2, result.stderr
    for command in ("info", "bench", "train", "demo"):  # the lesson's commands are listed too
        assert f"    {command} " in result.stdout, result.stdout


def test_cli_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout == f"pyfastnn {pyfastnn.__version__}\n", result


def test_cli_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert {r["pass"] for r in data["results"]} == {"fwd", "fwd+bwd"}
    assert all(r["fused_us"] > 0 and r["eager_us"] > 0 for r in data["results"])
    # What produced the figures: when, with which options, on which build.
    assert data["settings"]["quick"] is True and "json" not in data["settings"] and data["date"].endswith("+00:00")
    assert data["info"]["pyfastnn"] == pyfastnn.__version__
    from pyfastnn.benchmark import source_revision
    assert data["source"] == source_revision()


def test_benchmark_records_name_the_commit_of_the_source_tree(tmp_path):
    """The version number stays the same from commit to commit: a source tree's figures name the
    commit and whether tracked files differ from it; an installed copy names none."""
    from pyfastnn.benchmark import source_revision
    tree = tmp_path / "tree"
    (tree / "csrc").mkdir(parents=True)
    (tree / "pyfastnn").mkdir()
    (tree / "setup.py").write_text("")
    assert source_revision(tree / "pyfastnn") is None  # not a repository
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "setup.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "first"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    (tree / "notes.txt").write_text("untracked")  # an untracked file outside the sources changes nothing measured
    assert source_revision(tree / "pyfastnn") == {"commit": head, "modified": False}
    (tree / "csrc" / "new.cpp").write_text("")  # a new source file is built in
    assert source_revision(tree / "pyfastnn") == {"commit": head, "modified": True}
    (tree / "csrc" / "new.cpp").unlink()
    (tree / "setup.py").write_text("# changed")
    assert source_revision(tree / "pyfastnn") == {"commit": head, "modified": True}
    assert source_revision(tmp_path / "site-packages" / "pyfastnn") is None
    inner = tree / "vendored"  # a copy inside another repository: not that repository's commit
    (inner / "csrc").mkdir(parents=True)
    (inner / "pyfastnn").mkdir()
    (inner / "setup.py").write_text("")
    assert source_revision(inner / "pyfastnn") is None


def test_bench_json_dash_sends_the_json_alone_to_stdout_and_the_table_to_stderr(monkeypatch, capfd):
    import pyfastnn.benchmark as benchmark

    def fake_run(log=print, **kwargs):
        log("the table")
        return [{"case": "relu", "fused_us": 1.0}]

    monkeypatch.setattr(benchmark, "run", fake_run)
    for path in ("-", "/dev/stdout"):  # `--json - | jq` reads JSON only
        assert benchmark.main(["--quick", "--json", path]) == 0
        out, err = capfd.readouterr()
        assert json.loads(out)["results"] == [{"case": "relu", "fused_us": 1.0}], out
        assert "the table" in err and "wrote /dev/stdout" in err, err
    assert not Path("-").exists()
    # The program itself (its stdout guard), into a real pipe: `pyfastnn bench --json - | jq`.
    program = ("import sys, pyfastnn.benchmark as b; b.run = lambda log=print, **k: log('the table') or "
               "[{'case': 'relu'}]; sys.argv = ['pyfastnn', 'bench', '--quick', '--json', '-']; "
               "from pyfastnn.cli import run; run()")
    piped = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and json.loads(piped.stdout)["results"] == [{"case": "relu"}], piped
    assert "the table" in piped.stderr and "the table" not in piped.stdout
    # Another descriptor or a device: its "folder" (/proc/self/fd, /dev) is none to make again.
    for path in ("/dev/stderr", "/dev/null"):
        other = subprocess.run([sys.executable, "-c", program.replace("'-'", repr(path))], capture_output=True,
                               text=True, timeout=120)
        assert other.returncode == 0 and "error" not in other.stderr, (path, other.stderr)
    # A reader that stops early (`| head -1`) ends the output, not the command, as elsewhere.
    reader = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()
    assert reader.wait(timeout=120) == 0 and b"Broken pipe" not in reader.stderr.read()


def test_bench_json_folders_made_for_an_interrupted_run_are_removed(monkeypatch, tmp_path, capsys):
    import pyfastnn.benchmark as benchmark

    def interrupted(**kwargs):
        assert (tmp_path / "new" / "sub").is_dir()  # made up front: a bad path fails before the benchmark
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "run", interrupted)
    assert benchmark.main(["--quick", "--json", str(tmp_path / "new" / "sub" / "x.json")]) == 130
    assert list(tmp_path.iterdir()) == [] and "interrupted" in capsys.readouterr().err


# --- Mistakes and failures: one line, exit status 2 for usage, 1 for failures, --debug for the traceback ---

def test_bench_threads_default_to_no_more_than_the_cpus_available(monkeypatch):
    import pyfastnn.benchmark as benchmark

    asked = []
    monkeypatch.setattr(benchmark, "run", lambda **kwargs: asked.append(kwargs["threads"]) or [])
    monkeypatch.setattr(benchmark.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    for quick in ([], ["--quick"]):
        assert benchmark.main(quick + (["--no-compile"] if not quick else [])) == 0
    assert asked == [[1], [1]]


def test_bench_bad_arguments_fail_before_benchmarking(capsys, tmp_path):
    status, _, err = cli(capsys, "bench", "--quick", "--threads", "0")
    assert status == 2 and "argument --threads: must be >= 1, got 0" in error_line(err, "pyfastnn bench")
    status, _, err = cli(capsys, "bench", "--quick", "--threads", "100000")  # torch aborts on such counts
    assert status == 2 and "argument --threads: must be at most" in error_line(err, "pyfastnn bench")
    status, stdout, err = cli(capsys, "bench", "--quick", "--json", str(tmp_path))
    assert status == 2 and "is a folder" in error_line(err, "pyfastnn bench") and "fused us" not in stdout
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    status, stdout, err = cli(capsys, "bench", "--quick", "--json", str(blocker / "bench.json"))
    assert status == 2 and f"{blocker} is a file" in error_line(err, "pyfastnn bench") and "fused us" not in stdout


def test_bench_refuses_the_other_devices_options_and_cuda_without_a_gpu(capsys, monkeypatch):
    for arguments, problem in ((["--device", "cuda", "--threads", "1"], "--threads does not apply to --device cuda"),
                               (["--device", "cuda", "--no-compile"], "--no-compile does not apply to --device cuda"),
                               (["--profile"], "--profile does not apply to --device cpu"),
                               (["--min-run-time", "0.1"], "--min-run-time does not apply to --device cpu"),
                               (["--device", "cuda", "--profile"], "--quick does not apply to --profile")):
        status, stdout, err = cli(capsys, "bench", "--quick", *arguments)
        assert status == 2 and problem in error_line(err, "pyfastnn bench") and stdout == "", arguments
    import pyfastnn.benchmark as benchmark

    monkeypatch.setattr(benchmark, "info", lambda: {**pyfastnn.info(), "cuda_available": False})
    status, stdout, err = cli(capsys, "bench", "--device", "cuda", "--quick")
    assert status == 2 and stdout == ""
    assert error_line(err, "pyfastnn bench").endswith("--device cuda needs a CUDA GPU and a CUDA build of pyfastnn "
                                                      "(see pyfastnn info)")


def test_bench_device_cuda_runs_the_cuda_benchmark_with_its_options(capsys, monkeypatch, tmp_path):
    # Where a GPU is: the quick run is one shape in bfloat16, the full run every shape and dtype, and
    # --profile the kernel tables; the JSON names the device. (The benchmark itself: test_cuda.py.)
    import pyfastnn.benchmark as benchmark

    asked = []
    monkeypatch.setattr(benchmark, "info", lambda: {**pyfastnn.info(), "cuda_available": True})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: "a GPU")
    monkeypatch.setattr(benchmark, "run_cuda", lambda **kwargs: asked.append(kwargs) or {"layers": []})
    monkeypatch.setattr(benchmark, "profile_cuda", lambda: asked.append("profile") or [])
    assert benchmark.main(["--device", "cuda", "--quick", "--json", str(tmp_path / "quick.json")]) == 0
    assert asked.pop() == {"shapes": benchmark.CUDA_SHAPES[:1], "dtypes": (torch.bfloat16,),
                           "activations": benchmark.CUDA_QUICK_ACTIVATIONS, "min_run_time": 0.2}
    record = json.loads((tmp_path / "quick.json").read_text())
    assert record["device"] == "a GPU" and record["torch"] == torch.__version__ and "fp32_precision" in record
    assert record["settings"]["device"] == "cuda" and record["settings"]["min_run_time"] == 0.2
    assert record["layers"] == []
    # scripts/gpu_check.sh's quick run
    assert benchmark.main(["--device", "cuda", "--quick", "--min-run-time", "0.05"]) == 0
    assert asked.pop()["min_run_time"] == 0.05
    assert benchmark.main(["--device", "cuda", "--min-run-time", "0.05"]) == 0
    assert asked.pop() == {"min_run_time": 0.05}  # run_cuda's defaults: every shape, dtype and activation
    assert benchmark.main(["--device", "cuda", "--profile"]) == 0 and asked.pop() == "profile"
    assert capsys.readouterr().out.startswith(f"pyfastnn {pyfastnn.__version__} | torch ")


def test_the_cuda_benchmark_functions_refuse_bad_settings_and_name_what_they_need():
    from pyfastnn.benchmark import profile_cuda, run_cuda

    with pytest.raises(ValueError, match="run_cuda's min_run_time must be a finite number of seconds > 0, got inf"):
        run_cuda(min_run_time=float("inf"))
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        run_cuda(activations=("relu", "relu6"))
    if not pyfastnn.info()["cuda_available"]:  # (where there is a GPU, test_cuda.py runs them)
        for function in (run_cuda, profile_cuda):
            with pytest.raises(RuntimeError, match=f"{function.__name__} needs a CUDA GPU and a CUDA build"):
                function()


def test_info_bad_arguments(capsys):
    status, _, err = cli(capsys, "info", "--verbose")
    assert status == 2 and "unrecognized arguments: --verbose" in err and "Traceback" not in err
    for option in ("--json", "--debug", "--bogus"):  # a command's option without the command
        status, out, err = cli(capsys, option)
        assert status == 2 and err.startswith("usage: pyfastnn ") and "pyfastnn: error: unrecognized arguments" in err
        assert not out


def test_unexpected_errors_are_one_line_with_the_type_and_the_debug_hint(capsys, monkeypatch):
    from pyfastnn.command import command_parser, run_command

    parser = command_parser("pyfastnn check")

    def body():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    assert run_command(parser, parser.parse_args([]), body) == 1
    assert capsys.readouterr().err == ("pyfastnn check: error: RuntimeError: CUDA error: an illegal memory access was "
                                       "encountered (--debug or PYFASTNN_DEBUG=1 shows the traceback)\n")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_command(parser, parser.parse_args(["--debug"]), body)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_once_the_command_is_done_leaves_its_status(signal_name):
    # The signal comes as soon as the whole output has been read: the command is done; the process
    # must not then spend the time in which it would end a finished command with 143 / 130.
    import signal
    import subprocess
    import sys
    import time

    program = subprocess.Popen([sys.executable, "-m", "pyfastnn", "info", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines = []
    for line in program.stdout:  # up to the command's last line (or the end, should it fail)
        lines.append(line)
        if line == "}\n":
            break
    output = "".join(lines)
    time.sleep(0.25)  # past its return; Python and torch would still be tearing down for ~0.5 s more
    program.send_signal(getattr(signal, signal_name))
    assert program.wait(timeout=60) == 0, program.stderr.read()
    assert json.loads(output)["pyfastnn"] == pyfastnn.__version__ and program.stderr.read() == ""


def test_the_program_writes_each_line_as_it_is_printed_into_pipes_and_files():
    # Piped or redirected (tee, nohup, a batch system's log), each epoch's line must not wait in a buffer.
    import subprocess
    import sys

    program = ("import sys\n"
               "import pyfastnn.cli as cli\n"
               "command = cli.main\n"
               "def main_then_report():\n"
               "    status = command()\n"
               "    sys.stderr.write(f'line_buffering={sys.stdout.line_buffering}')\n"
               "    return status\n"
               "cli.main = main_then_report\n"
               "sys.argv = ['pyfastnn', 'info']\n"
               "cli.run()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and result.stderr == "line_buffering=True", result.stderr


@pytest.mark.parametrize("streams", ["stdout", "stdout and stderr"])
def test_a_reader_that_goes_away_stops_the_output_not_the_command(tmp_path, streams):
    # `pyfastnn train ... | head -1` (or `2>&1 | head -1`): the pipe closes; the command goes on.
    import subprocess
    import sys

    program = ("import sys\n"
               "import pyfastnn.cli as cli\n"
               "command = cli.main\n"
               "def main_then_mark():\n"
               "    status = command()\n"
               f"    open({str(tmp_path / 'done')!r}, 'w').close()\n"
               "    return status\n"
               "cli.main = main_then_mark\n"
               "sys.argv = ['pyfastnn', 'info']\n"
               "print('printed before the command')\n"
               "cli.run()\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        result = subprocess.run([sys.executable, "-c", program], stdout=write_end, text=True, timeout=120, env=env,
                                stderr=write_end if streams == "stdout and stderr" else subprocess.PIPE)
    finally:
        os.close(write_end)
    assert result.returncode == 0 and result.stderr in (None, ""), result.stderr
    assert (tmp_path / "done").exists()


def test_output_that_cannot_be_written_is_one_line_and_a_closed_stderr_is_no_failure(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for args in (["info"], ["--help"], ["--version"], ["info", "--help"]):  # argparse's exits too
        with open("/dev/full", "w") as full:  # a full disk under `> log`
            result = subprocess.run([sys.executable, "-m", "pyfastnn", *args], stdout=full, stderr=subprocess.PIPE,
                                    text=True, timeout=120, env=env)
        assert result.returncode == 1, args
        program = "pyfastnn info" if args[0] == "info" else "pyfastnn"  # as the command's other errors start
        assert result.stderr == f"{program}: error: the output could not be written (No space left on device)\n"
    result = subprocess.run([sys.executable, "-m", "pyfastnn", "info"], capture_output=False, stdout=subprocess.PIPE,
                            text=True, timeout=120, env=env, preexec_fn=lambda: os.close(2))  # 2>&-
    assert result.returncode == 0 and "pyfastnn" in result.stdout


def test_under_a_profiler_the_program_exits_the_usual_way(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(tmp_path / "profile.out"), "-m", "pyfastnn",
                             "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and (tmp_path / "profile.out").stat().st_size > 0, result.stderr


def test_a_tool_registered_with_sys_monitoring_gets_the_usual_exit_too():
    # From Python 3.12 cProfile (and other tools) register with sys.monitoring (PEP 669), not
    # sys.setprofile. Older Pythons get a stand-in with the same get_tool(), so the check runs on each.
    import subprocess
    import sys

    code = """
import sys, types
if hasattr(sys, "monitoring"):
    sys.monitoring.use_tool_id(sys.monitoring.PROFILER_ID, "a profiler")
else:
    sys.monitoring = types.SimpleNamespace(get_tool=lambda tool: "a profiler" if tool == 2 else None)
sys.argv = ["pyfastnn", "info"]
from pyfastnn.cli import run
try:
    run()
except SystemExit as done:
    print("exited the usual way with status", done.code)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "exited the usual way with status 0", result.stdout


def test_a_run_that_finds_its_new_folder_held_leaves_it_to_the_holder(tmp_path, monkeypatch):
    # Two runs start into a new folder: one makes it, the other takes it first; the first must not
    # remove the folder the holder is about to write into.
    import contextlib

    import pyfastnn.files as files

    @contextlib.contextmanager
    def held_by_another_run(path, what="output folder"):
        raise BlockingIOError(f"{what} {path} is in use by another run")
        yield

    monkeypatch.setattr(files, "hold_folder", held_by_another_run)
    with pytest.raises(BlockingIOError, match="in use"):
        with files.output_folder(tmp_path / "runs" / "a"):
            pass
    assert (tmp_path / "runs" / "a").is_dir()


def test_a_folder_removed_by_its_last_holder_while_being_taken_is_made_again(tmp_path, monkeypatch):
    # The run that held it stopped before its first file and removed the folder it had made, just
    # after this run opened it: this run must not hold a folder no path leads to.
    import fcntl

    from pyfastnn.files import output_folder

    folder, removed, real_flock = tmp_path / "runs" / "a", [], fcntl.flock

    def flock_once_the_holder_removed_it(fd, operation):
        if not removed:
            removed.append(folder)
            folder.rmdir()
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_once_the_holder_removed_it)
    with output_folder(folder) as out:
        assert removed and out.is_dir()
        (out / "metrics.json").write_text("{}")


def test_atomic_write_names_the_target_when_its_folder_is_missing(tmp_path):
    from pyfastnn.files import atomic_write

    target = tmp_path / "missing" / "metrics.json"
    with pytest.raises(FileNotFoundError) as caught:
        with atomic_write(target) as f:
            f.write(b"{}")
    assert caught.value.filename == str(target)


def test_atomic_write_writes_through_links_and_devices_and_refuses_folders(tmp_path):
    import os
    import stat

    from pyfastnn.files import atomic_write

    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    link.symlink_to(real)
    with atomic_write(link) as f:
        f.write(b"new")
    assert link.is_symlink() and real.read_text() == "new"
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)  # like /dev/null or /dev/stdout: no file to replace, the bytes go into it
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with atomic_write(pipe) as f:
            f.write(b"through")
        assert os.read(reader, 100) == b"through" and stat.S_ISFIFO(os.stat(pipe).st_mode)
    finally:
        os.close(reader)
    with pytest.raises(IsADirectoryError) as caught:
        with atomic_write(tmp_path) as f:
            raise AssertionError("the block must not run")
    assert caught.value.filename == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "pipe", "real.json"]
    with pytest.raises(OSError) as caught:  # a full device names itself, as a full disk names the file
        with atomic_write("/dev/full") as f:
            f.write(b"no room")
    assert caught.value.filename == "/dev/full"


def test_dev_stdout_is_written_through_the_descriptor_wherever_it_leads(tmp_path):
    import os
    import subprocess
    import sys

    from pyfastnn.files import check_output_file

    write = ("from pyfastnn.files import atomic_write, check_output_file\n"
             "check_output_file('/dev/stdout')\n"
             "print('table')\n"
             "with atomic_write('/dev/stdout') as f:\n"
             "    f.write(b'{}\\n')\n")
    log = tmp_path / "log.txt"
    log.write_text("earlier\n")
    with open(log, "a") as appended:  # `>> log.txt`: appended to, not replaced or truncated
        subprocess.run([sys.executable, "-c", write], stdout=appended, check=True)
    assert log.read_text() == "earlier\ntable\n{}\n"
    piped = subprocess.run([sys.executable, "-c", write], stdout=subprocess.PIPE, check=True)  # `| cat`
    assert piped.stdout == b"table\n{}\n"
    with pytest.raises(OSError) as caught:  # a descriptor this process does not have open
        check_output_file("/dev/fd/987")
    assert caught.value.filename == "/dev/fd/987" and "987" not in caught.value.strerror  # named once by the CLI
    read_only = os.open(log, os.O_RDONLY)
    try:  # refused before the work, not when the result is written
        with pytest.raises(PermissionError, match="is not open for writing") as caught:
            check_output_file(f"/dev/fd/{read_only}")
        assert caught.value.filename == f"/dev/fd/{read_only}"
    finally:
        os.close(read_only)
    (tmp_path / "stdout").symlink_to("/dev/stdout")  # through a link: piped, the pipe's name is no file
    linked = f"from pyfastnn.files import check_output_file\ncheck_output_file({str(tmp_path / 'stdout')!r})\n"
    refused = subprocess.run([sys.executable, "-c", linked], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert refused.returncode != 0 and b"is not writable" in refused.stderr, refused.stderr
    import socket
    import tempfile

    with tempfile.TemporaryDirectory() as short, socket.socket(socket.AF_UNIX) as server:  # AF_UNIX paths are short
        server.bind(os.path.join(short, "s"))
        with pytest.raises(FileExistsError, match="is a socket, which no file can be written to"):
            check_output_file(os.path.join(short, "s"))
    interrupted = ("from pyfastnn.files import atomic_write\n"
                   "try:\n"
                   "    with atomic_write('/dev/stdout') as f:\n"
                   "        f.write(b'{\"half\": ')\n"
                   "        raise KeyboardInterrupt\n"
                   "except KeyboardInterrupt:\n"
                   "    pass\n")
    assert subprocess.run([sys.executable, "-c", interrupted], stdout=subprocess.PIPE, check=True).stdout == b""


def test_atomic_write_keeps_a_replaced_files_permissions_and_refuses_a_folder_name(tmp_path):
    """A file locked down to 0o600 became world-readable when replaced; a name ending in "/" was
    written as a file, where open() and --json's check refuse it."""
    import stat

    from pyfastnn.files import atomic_write

    private = tmp_path / "checkpoint.json"
    private.write_text("old")
    private.chmod(0o600)
    with atomic_write(private) as f:
        f.write(b"new")
    assert private.read_text() == "new" and stat.S_IMODE(private.stat().st_mode) == 0o600
    for name in (f"{tmp_path}/new/", f"{tmp_path}/new/.", f"{tmp_path}/new/.."):
        with pytest.raises(IsADirectoryError) as caught:
            with atomic_write(name) as f:
                raise AssertionError("the block must not run")
        assert caught.value.filename == name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json"]


def test_an_output_folder_through_dot_dot_leaves_no_folder_when_the_run_stops(tmp_path, monkeypatch):
    from pyfastnn.files import output_folder

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError):
        with output_folder("q/../runs/a"):  # mkdir makes q on its way
            raise RuntimeError("stopped before its first file")
    assert list(tmp_path.iterdir()) == []


def test_benchmark_json_holds_null_for_a_figure_that_is_no_number(tmp_path):
    from pyfastnn.benchmark import write_results

    path = tmp_path / "bench.json"
    write_results(str(path), {"results": [{"us": float("nan"), "ratio": float("inf"), "pair": (1.5, 2)}]})
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert json.loads(path.read_text()) == {"results": [{"us": None, "ratio": None, "pair": [1.5, 2]}]}


def test_atomic_write_names_the_target_when_the_rename_fails(tmp_path, monkeypatch):
    import os

    from pyfastnn.files import atomic_write

    def refuse(source, target):
        raise OSError(28, "No space left on device", source, None, target)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError) as caught:
        with atomic_write(tmp_path / "metrics.json") as f:
            f.write(b"{}")
    assert caught.value.filename == str(tmp_path / "metrics.json") and ".tmp" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    # An error about another file, one the block reads, keeps that file's name.
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError) as caught:
        with atomic_write(tmp_path / "out.bin") as f:
            f.write((tmp_path / "missing-input").read_bytes())
    assert caught.value.filename == str(tmp_path / "missing-input") and list(tmp_path.iterdir()) == []


def test_a_json_path_ending_in_a_slash_names_a_folder_and_writes_nothing(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    for path in (f"{keep}/", f"{keep}/.", f"{tmp_path / 'new'}/"):  # as the shell's `> path/` refuses it
        result = subprocess.run([sys.executable, "-m", "pyfastnn", "bench", "--quick", "--json", path],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and f"--json {path} names a folder; give a file name" in result.stderr
    assert keep.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("program,prog", [(["benchmarks/bench_fused_linear.py"], "bench_fused_linear.py"),
                                          (["benchmarks/bench_cuda.py"], "bench_cuda.py"),
                                          (["-m", "pyfastnn", "bench"], "pyfastnn bench")])
def test_benchmark_scripts_give_their_own_name_in_usage_and_errors(program, prog):
    root = Path(__file__).resolve().parents[2]  # the checkout: the scripts run from there
    refused, shown = (subprocess.run([sys.executable, *program, argument], capture_output=True, text=True,
                                     timeout=120, cwd=root) for argument in ("--bogus", "--help"))
    assert refused.returncode == 2 and refused.stderr.startswith(f"usage: {prog} [-h]"), refused.stderr
    assert error_line(refused.stderr, prog) == f"{prog}: error: unrecognized arguments: --bogus"
    # The help's examples are the program's own command lines.
    assert shown.stdout.startswith(f"usage: {prog} [-h]")
    assert ("pyfastnn bench" in shown.stdout) == (prog == "pyfastnn bench"), shown.stdout


@pytest.mark.parametrize("script,arguments,problem", [
    ("bench_overhead.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("bench_mlp_call_overhead.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("bench_cuda.py", ["--min-run-time", "inf"], "argument --min-run-time: must be a finite number > 0"),
    ("bench_cuda.py", ["--dev=cpu"], "--device: this script benchmarks the GPU"),
    pytest.param("bench_mnist.py", ["--quick", "--json", ""], "argument --json: must be a path, got an empty string",
                 marks=pytest.mark.skipif(bool(missing_lesson_requirements()),
                                          reason="bench_mnist.py runs the lesson: needs the lesson extra")),
    pytest.param("bench_mnist.py", ["--device", "cuda", "--whole-process", "1"],
                 "--full-script and --whole-process run on the CPU",  # not ignored without a word
                 marks=pytest.mark.skipif(bool(missing_lesson_requirements()),
                                          reason="bench_mnist.py runs the lesson: needs the lesson extra")),
])
def test_benchmark_scripts_refuse_arguments_they_cannot_take(script, arguments, problem):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / script
    result = subprocess.run([sys.executable, str(path), *arguments], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and problem in result.stderr, result.stderr


def test_a_benchmark_script_stopped_by_ctrl_c_says_so_in_one_line():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cpu_time.py"
    process = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("pyfastnn ")  # its header: the benchmark has begun
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130 and err == "bench_cpu_time.py: interrupted\n", err


@pytest.mark.skipif(pyfastnn.info()["cuda_available"], reason="this build runs CUDA: the GPU check runs both")
@pytest.mark.parametrize("script", ["benchmarks/bench_cuda.py --quick", "scripts/fuzz_fused_linear.py --device cuda"])
def test_cuda_scripts_refuse_a_build_or_machine_without_cuda_before_any_work(script):
    # torch alone seeing a GPU is not enough: a CPU-only pyfastnn beside a CUDA torch has no CUDA kernels.
    path, *arguments = script.split()
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / path), *arguments],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.rstrip().endswith("needs a CUDA GPU and a CUDA build of pyfastnn (see pyfastnn info)")


def test_a_json_path_through_a_dangling_link_is_written_where_the_link_points(tmp_path):
    # The up-front check looks at the folder the file really lands in (a link's target's), so the
    # benchmark never runs only to fail when it saves.
    from pyfastnn.files import atomic_write, check_output_file

    link = tmp_path / "bench.json"
    link.symlink_to(tmp_path / "missing" / "bench.json")
    check_output_file(link)
    with atomic_write(link) as f:
        f.write(b"{}")
    assert (tmp_path / "missing" / "bench.json").read_text() == "{}"
