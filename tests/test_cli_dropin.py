"""The command line as scripts rely on it (issue 11): exit codes, --version, global flags
anywhere, every step spelling, one-line errors, plain-text inspect, Ctrl-C. Run as users run it:
the console script in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import resilient_train as rt
from resilient_train.cli import _hoist_global_flags, build_parser, main

from .helpers import make_run, train_steps

CLI = [os.path.join(os.path.dirname(sys.executable), "resilient-train")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def run(*args):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=120, env=ENV)


class Out:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture
def cli(capsys):
    """The same main() the console script runs, in this process (no torch import per call)."""

    def call(*args):
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: usage errors, --version
            code = exc.code
        out, err = capsys.readouterr()
        return Out(code, out, err)

    return call


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "run"
    state = make_run()
    train_steps(state, 2)
    rt.save(str(root), state, 999)
    return str(root)


def test_version_and_info_logs_by_default_as_installed(ckpt):
    out = run("--version")
    assert out.returncode == 0 and rt.__version__ in out.stdout
    default = run("ckpt", "verify", ckpt)
    assert default.returncode == 0 and "INFO" in default.stderr and "DEBUG" not in default.stderr, "INFO on stderr by default"


def test_global_flags_before_or_after_the_subcommand(ckpt, cli):
    parser = build_parser()
    for argv, level in ((["ckpt", "ls", ckpt], 1), (["-v", "ckpt", "ls", ckpt], 2), (["ckpt", "ls", ckpt, "-v"], 2), (["ckpt", "ls", ckpt, "-q"], 0), (["-q", "ckpt", "ls", ckpt], 0)):
        assert parser.parse_args(_hoist_global_flags(argv)).verbose == level, argv
    opts = json.dumps({})
    assert cli("--storage-options", opts, "ckpt", "ls", ckpt).returncode == 0
    assert cli("ckpt", "ls", ckpt, "--storage-options", opts).returncode == 0
    assert cli("--storage-options", "[1]", "ckpt", "ls", ckpt).returncode == 2


def test_every_step_spelling(ckpt, cli, tmp_path):
    for args in (["ckpt", "verify", f"{ckpt}/step-999"], ["ckpt", "verify", f"{ckpt}/step-0000000999"], ["ckpt", "verify", ckpt, "--step", "999"], ["ckpt", "verify", ckpt, "--step", "step-999"], ["ckpt", "inspect", ckpt, "--step", "step-0000000999"]):
        proc = cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
    proc = cli("ckpt", "migrate", f"{ckpt}/step-999", str(tmp_path / "dst"), "--no-progress")
    assert proc.returncode == 0 and "step 999:" in proc.stdout, proc.stderr
    proc = cli("ckpt", "verify", f"{ckpt}/step-999", "--step", "5")
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "--step" in proc.stderr


def test_exit_codes_and_one_line_errors(ckpt, cli, tmp_path):
    missing = cli("ckpt", "ls", str(tmp_path / "no-such-folder"))
    assert missing.returncode == 3 and "nothing found" in missing.stderr and "no checkpoints" not in missing.stdout
    assert cli("ckpt", "verify", ckpt, "--step", "7").returncode == 3
    bad = cli("ckpt", "ls", ckpt, "--storage-options", "{not json")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and lines[0].startswith("error: --storage-options is not valid JSON") and len(lines[0]) < 120
    assert cli("ckpt", "frobnicate", ckpt).returncode == 2
    assert "Traceback" not in missing.stderr + bad.stderr


def test_corrupt_source_is_a_failed_check_not_run_again(ckpt, cli, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ckpt, src)
    victim = next(p for p in (src / "step-0000000999").iterdir() if p.name.startswith("model"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    proc = cli("ckpt", "migrate", str(src), str(tmp_path / "dst"), "--no-progress")
    first = proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else ""
    assert proc.returncode == 1, proc.stderr
    assert first.startswith("error: step 999 was not committed") and len(first) < 160
    assert "run again" not in proc.stderr and victim.name in proc.stderr


def test_inspect_plain_text_and_json(ckpt, cli):
    text = cli("ckpt", "inspect", ckpt).stdout
    assert "__tuple__" not in text and "betas=(0.9, 0.999)" in text and "note: 'tiny'" in text
    assert "..." not in text.split("state:")[1]  # nothing cut
    js = json.loads(cli("ckpt", "inspect", ckpt, "--json").stdout)
    assert js["manifest"]["step"] == 999


def test_ctrl_c_at_start_up_exits_130_without_traceback(ckpt):
    proc = subprocess.Popen(CLI + ["-v", "ckpt", "verify", ckpt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    first = proc.stderr.readline()  # main() is running; the command now imports torch (seconds)
    assert "resilient-train" in first, first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_first_ctrl_c_stops_migrate_within_a_second_resumably(make_store, servers, tmp_path):
    from resilient_train.checkpoint import verify_checkpoint
    from resilient_train.checkpoint.steps import committed_steps
    from resilient_train.checkpoint.writer import SaveOptions
    from resilient_train.storage import open_store

    from .conftest import make_train_state

    make_store("s3")  # starts the server
    srv = servers["s3"]
    src = str(tmp_path / "src")
    rt.save(src, make_train_state(width=2048), 5, options=SaveOptions(max_file_bytes=4 << 20))
    dst = srv.uri("rt-tests", f"ctrl-c-{os.getpid()}")
    opts = json.dumps(srv.storage_options)
    args = CLI + ["ckpt", "migrate", src, dst, "--dst-storage-options", opts, "--threads", "2", "--no-progress"]
    d = open_store(dst, {**srv.storage_options, "skip_instance_cache": True, "use_listings_cache": False})  # sees the CLI's writes
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if d.list("step-0000000005"):
                break
        except Exception:
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the copy finished before it could be interrupted: make the checkpoint bigger"
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stderr), daemon=True)
    reader.start()
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    stopped_s = time.monotonic() - t0
    reader.join(10)
    err = "".join(line for _, line in lines)
    print("\n".join(f"{t - t0:+.2f} s {line.rstrip()}" for t, line in lines))
    assert proc.returncode == 130, err
    assert stopped_s < 3.0, f"took {stopped_s:.2f} s to stop"  # ~0.4 s measured; headroom for a loaded machine
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert committed_steps(d) == []
    again = subprocess.run(args, capture_output=True, text=True, timeout=180, env=ENV)
    assert again.returncode == 0, again.stderr
    assert committed_steps(d) == [5] and verify_checkpoint(d, 5)[1] == []
    print(f"stopped {stopped_s:.2f} s after Ctrl-C; resumed: {again.stdout.strip()}")
    # A bucket that does not exist is "not found" (exit 3), not "no checkpoints" (exit 0).
    assert main(["ckpt", "ls", srv.uri("no-such-bucket-rt", "run"), "--storage-options", opts]) == 3
