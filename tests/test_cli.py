"""The command edge every command shares (caption_io.cli, caption_io.quiet): the error line
and exit code, Ctrl-C, logging, --verbose, and a start without TensorFlow's C++ chatter."""
from __future__ import annotations

import importlib
import logging
import os
import select
import subprocess
import sys
import threading
import time

import pytest

from caption_io import cli, quiet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["pipelines.preprocess", "pipelines.caption_images", "pipelines.validate", "pipelines.synthetic",
            "pipelines.download",
            "trainer.task", "trainer.launch", "caption_serving.export", "caption_serving.caption",
            "caption_serving.serve", "caption_serving.request", "caption_eval.evaluate"]
# Words of the start-up lines TensorFlow writes on import and first op (CPU machines: the
# first three at least; GPU machines: some of the others).
START_UP_WORDS = ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub.cc", "cpu_feature_guard",
                  "cuInit", "rebuild TensorFlow with the appropriate compiler flags")


def _env(**extra):
    """The environment a user has: no log level or verbose switch of ours set."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", quiet.VERBOSE_ENV)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _python(code, *args, timeout=120, **env):
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------ the quiet start
TF_SCRIPT = """
import subprocess, sys
from caption_io import quiet
quiet.install()
import tensorflow as tf
print(int(tf.reduce_sum(tf.constant([1, 2]))))
print("a line after the import", file=sys.stderr)
subprocess.run([sys.executable, "-c", "import sys; print('a line from a child', file=sys.stderr)"])
raise RuntimeError("an uncaught error")
"""


def test_the_quiet_start_drops_tensorflows_start_up_lines_and_nothing_else():
    proc = _python(TF_SCRIPT)
    assert proc.returncode == 1 and proc.stdout.strip() == "3", proc.stderr
    for word in START_UP_WORDS:
        assert word not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert "a line after the import" in lines and "a line from a child" in lines, proc.stderr
    assert "Traceback (most recent call last):" in lines and lines[-1] == "RuntimeError: an uncaught error"


def test_verbose_shows_tensorflows_start_up_lines():
    proc = _python(TF_SCRIPT, "--verbose")
    assert proc.returncode == 1 and proc.stdout.strip() == "3", proc.stderr
    assert any(word in proc.stderr for word in START_UP_WORDS), proc.stderr
    assert proc.stderr.splitlines()[-1] == "RuntimeError: an uncaught error"


def test_lines_written_just_before_an_abort_still_arrive():
    # Why the filter is a process: a C++ abort would take a thread down with what it holds.
    proc = _python("import os, sys\nfrom caption_io import quiet\nquiet.install()\n"
                   "print('the reason, just before the crash', file=sys.stderr)\nsys.stderr.flush()\nos.abort()")
    assert proc.returncode == -6
    assert proc.stderr.splitlines() == ["the reason, just before the crash"]


def test_a_terminal_stays_a_terminal():
    """Progress bars ask isatty(): under the filter, stderr on a terminal is still one."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", "import os, sys\nfrom caption_io import quiet\n"
                                 "print(quiet.install(), os.isatty(2), file=sys.stderr)"],
                                cwd=ROOT, env=_env(), stderr=slave)
        os.close(slave)
        out = b""
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the last writer has gone
                break
            if not data:
                break
            out += data
        assert proc.wait(30) == 0
    finally:
        os.close(master)
    assert out.decode().split() == ["True", "True"]


@pytest.mark.parametrize("line, start_up", [
    (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n", True),
    (b"I0000 00:00:1796128497.924180    9476 port.cc:153] oneDNN custom operations are on. You may see "
     b"slightly different numerical results.\n", True),
    (b"I0000 00:00:1796128497.924557    9476 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
     b"GPU will not be used.\n", True),
    (b"E0000 00:00:1796128500.412666    9476 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
     b"Failed call to cuInit: UNKNOWN ERROR (303)\n", True),
    (b"I0000 00:00:1796128498.021003    9476 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to "
     b"use available CPU instructions in performance-critical operations.\n", True),
    (b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the "
     b"appropriate compiler flags.\n", True),
    (b"E0000 00:00:1796131716.800316   12791 util.cc:131] oneDNN supports DT_HALF only on platforms with "
     b"AVX-512. Falling back to the default Eigen-based implementation if present.\n", True),
    # Not start-up lines: TensorFlow's real complaints, and everything else.
    (b"E0000 00:00:1796128500.412666    9476 cuda_platform.cc:52] out of memory\n", False),
    (b"F0512 12:00:00.000000    9476 tensor.cc:10] Check failed: shape\n", False),
    (b"W0512 12:00:00.000000    9476 port.cc:153] something else entirely\n", False),
    (b"error: --model x: no such directory\n", False),
    (b"Traceback (most recent call last):\n", False),
])
def test_only_the_known_start_up_lines_are_dropped(line, start_up):
    assert quiet.is_start_up(line) is start_up


def _filtered(chunks, pause=0.0):
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    t = threading.Thread(target=quiet.run_filter, args=(src_r, dst_w))
    t.start()
    for chunk in chunks:
        os.write(src_w, chunk)
        time.sleep(pause)
    os.close(src_w)
    t.join(10)
    os.close(dst_w)
    out = b""
    while data := os.read(dst_r, 65536):
        out += data
    os.close(src_r)
    os.close(dst_r)
    return out


def test_the_filter_passes_everything_else_byte_for_byte():
    start_up = b"I0000 00:00:1.5  9 port.cc:153] oneDNN custom operations are on.\n"
    chunks = [b"first\n", start_up[:7], start_up[7:], b"\r 10%|#  ", b"\r 50%|#####", b"\n",
              b"I0 is a line of its own\n", b"no newline at the end"]
    assert _filtered(chunks, pause=0.02) == (b"first\n\r 10%|#  \r 50%|#####\nI0 is a line of its own\n"
                                             b"no newline at the end")


def test_a_partial_line_is_passed_on_at_once():
    """A progress bar's update (no newline) reaches the terminal while the command runs."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    t = threading.Thread(target=quiet.run_filter, args=(src_r, dst_w))
    t.start()
    try:
        os.write(src_w, b"\r 42%|####")
        ready, _, _ = select.select([dst_r], [], [], 2)
        assert ready and os.read(dst_r, 100) == b"\r 42%|####"
        os.write(src_w, b"I0000")  # could be a start-up line: held HOLD_S at most, then passed on
        ready, _, _ = select.select([dst_r], [], [], 2)
        assert ready and os.read(dst_r, 100) == b"I0000"
    finally:
        os.close(src_w)
        t.join(10)
        for fd in (src_r, dst_r, dst_w):
            os.close(fd)


def test_verbose_is_the_flag_spelt_out_or_the_environment(monkeypatch):
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    assert quiet.verbose_requested(["--model", "m", "--verbose"])
    assert not quiet.verbose_requested(["--model", "m"])
    assert not quiet.verbose_requested(["--dry-run", "--", "--verbose"])  # the trainer's flag, not launch's
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    assert quiet.verbose_requested([])


def test_the_caption_console_script_does_not_import_tensorflow_before_its_quiet_start():
    proc = _python("import sys\nimport caption_serving.caption\nprint('tensorflow' in sys.modules)", timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


# ------------------------------------------------------------------- errors and exit codes
def _raises(exc):
    def main(argv):
        print("a result")
        raise exc
    return main


def test_a_user_error_is_one_line_and_its_exit_code(capsys, clean_logging):
    class Busy(cli.UserError):
        exit_code = 3

    assert cli.run(_raises(cli.UserError("cannot use --data x:\n  no metadata.json")), []) == 2
    out, err = capsys.readouterr()
    assert out == "a result\n" and err == "error: cannot use --data x: no metadata.json\n"
    assert cli.run(_raises(Busy("try later")), []) == 3
    assert capsys.readouterr().err == "error: try later\n"


def test_ctrl_c_is_one_line_and_130(capsys, clean_logging):
    assert cli.run(_raises(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    main = cli.command(interrupted="interrupted; run it again to resume")(_raises(KeyboardInterrupt()))
    assert main([]) == 130
    assert capsys.readouterr().err == "error: interrupted; run it again to resume\n"


def test_a_bug_keeps_its_traceback(clean_logging):
    with pytest.raises(ZeroDivisionError):
        cli.run(_raises(ZeroDivisionError("a bug")), [])
    with pytest.raises(OSError):  # a plain OSError is no user error (a WriteError is)
        cli.run(_raises(OSError("a bug too")), [])


def test_exit_status_is_what_main_returns(clean_logging):
    assert cli.run(lambda argv: None, []) == 0
    assert cli.run(lambda argv: len(argv), ["a", "b"]) == 2


def test_no_argv_means_the_process_is_the_command(monkeypatch, clean_logging):
    installs, seen = [], []
    monkeypatch.setattr(quiet, "install", lambda *a: installs.append(a))
    monkeypatch.setattr(sys, "argv", ["caption", "photo.jpg"])
    assert cli.run(lambda argv: seen.append(argv), None) == 0
    assert installs == [()] and seen == [["photo.jpg"]]
    cli.run(lambda argv: None, ["photo.jpg"])
    assert len(installs) == 1  # tests and other callers keep the process's stderr as it is


@pytest.mark.parametrize("where, name, code", [
    ("caption_io.fileio", "WriteError", 2), ("caption_io.vocab", "VocabError", 2),
    ("caption_io.images", "ImageError", 2), ("caption_io.jobdir", "RecordedPathError", 2),
    ("model.backbones", "EncoderWeightsError", 2), ("model.backbones", "BackboneError", 2),
    ("model.fused_attention", "KernelError", 2),
    ("caption_serving.caption", "InputError", 1), ("caption_serving.caption", "ModelError", 2),
    ("caption_serving.export", "ExportError", 2), ("caption_serving.serve", "ServeError", 2),
    ("caption_serving.request", "RequestError", 2),
    ("caption_eval.evaluate", "UsageError", 2), ("caption_eval.evaluators.coco_metrics", "ScoringError", 1),
    ("pipelines.preprocess", "UsageError", 2), ("pipelines.sources", "SourceError", 1),
    ("pipelines.caption_images", "UsageError", 2), ("pipelines.caption_images", "CountsError", 1),
    ("pipelines.validate", "NotADataDir", 2), ("pipelines.download", "DownloadError", 1),
    ("trainer.data", "DataError", 2), ("trainer.loop", "TrainError", 2), ("trainer.launch", "SubmitError", 1),
])
def test_every_user_facing_error_is_a_user_error_with_its_commands_exit_code(where, name, code):
    cls = getattr(importlib.import_module(where), name)
    assert issubclass(cls, cli.UserError) and cls.exit_code == code


def test_a_write_error_is_still_an_os_error():
    from caption_io import fileio

    e = fileio.WriteError("cannot write x: no space left on device", "x", 28)
    assert isinstance(e, OSError) and e.errno == 28 and str(e) == "cannot write x: no space left on device"


# --------------------------------------------------------------------------------- logging
def test_logs_go_to_stderr_and_verbose_turns_on_debug(capsys, clean_logging):
    cli.setup_logging(False)
    logging.getLogger("pipelines.preprocess").info("progress")
    logging.getLogger("pipelines.preprocess").debug("detail")
    logging.getLogger("some.library").info("library chatter")
    logging.getLogger("__main__").info("a command run with python -m")
    out, err = capsys.readouterr()
    assert out == "" and err == "progress\na command run with python -m\n"
    cli.Parser(prog="x").parse_args(["--verbose"])  # the flag itself turns it on
    assert cli.is_verbose()
    logging.getLogger("pipelines.preprocess").debug("detail")
    err = capsys.readouterr().err
    assert err.endswith("DEBUG pipelines.preprocess: detail\n") and err.count("\n") == 1


# ------------------------------------------------------------------------ every command
@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_has_help_and_a_bad_flag_is_one_line(module):
    run = dict(cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Side by side: each starts TensorFlow in some commands, and there are nine commands.
    helped = subprocess.Popen([sys.executable, "-m", module, "--help"], **run)
    bad = subprocess.Popen([sys.executable, "-m", module, "--no-such-flag"], **run)
    out, err = helped.communicate(timeout=120)
    assert helped.returncode == 0, err
    assert "--verbose" in out and err == ""  # not one line of TensorFlow's start-up
    out, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err


def test_the_caption_console_script():
    script = os.path.join(os.path.dirname(sys.executable), "caption")
    if not os.path.exists(script):
        pytest.skip("the package is not installed (pip install -e .): no caption script")
    proc = subprocess.run([script, "--no-such-flag", "photo.jpg"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_trainer_summary_names_only_the_losses_there_are(monkeypatch, capsys, tmp_path, clean_logging):
    from trainer import loop, task

    class Trainer:
        chief = True

        def __init__(self, settings):
            pass

        def run(self):
            return {"steps": 3, "stopped": "max_steps", "final_train_loss": None, "final_val_loss": None}

    monkeypatch.setattr(loop, "Trainer", Trainer)
    argv = ["--data", str(tmp_path), "--job-dir", str(tmp_path / "job"), "--max-steps", "3", "--no-validate",
            "--no-export"]
    assert task.main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "None" not in line and line.startswith("trained 3 steps (max_steps); no epoch completed"), line
