"""The training loop: repeatable, resumable, distributed the same as on one device."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import exit_code
from trainer import loop, task
from trainer import steps as steps_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per-epoch caption metrics off: tests/test_epoch_metrics.py has them (they cost seconds an epoch here).
SMALL = ["--units", "64", "--embedding-dim", "32", "--batch-size", "8", "--no-progress", "--eval-images", "0"]


def _settings(data, job, *extra):
    return task.parse_args(["--data", data, "--job-dir", str(job), *SMALL, *extra])


def _losses(metrics):
    return [(h["step"], round(h["train_loss"], 6), round(h.get("val_loss", 0), 6)) for h in metrics["history"]]


def test_fused_adam_updates_like_keras_adam():
    # StepAdam runs TensorFlow's fused kernel; it must be Keras's Adam to float rounding,
    # variables and both moment slots, over several steps (the bias correction changes).
    shapes = [(7, 5), (5,), (3, 4, 2)]

    def run(optimizer_class):
        variables = [keras.Variable(np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s))
                     for s in shapes]
        optimizer = optimizer_class(learning_rate=0.01)
        optimizer.build(variables)
        apply = tf.function(lambda grads: optimizer.apply_gradients(zip(grads, variables)))
        rng = np.random.default_rng(1)
        for _ in range(5):
            apply([tf.constant(rng.standard_normal(s).astype(np.float32)) for s in shapes])
        return ([v.numpy() for v in variables] + [m.numpy() for m in optimizer._momentums]
                + [v.numpy() for v in optimizer._velocities])

    start = np.linspace(-1, 1, 35, dtype=np.float32).reshape(7, 5)
    fused, reference = run(steps_mod.StepAdam), run(keras.optimizers.Adam)
    assert np.abs(fused[0] - start).max() > 0.02          # it did move the variables
    for a, b in zip(fused, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss_and_writes_its_outputs(small_data, tmp_path):
    m = loop.train(_settings(small_data, tmp_path / "job", "--epochs", "10", "--learning-rate", "3e-3"))
    h = m["history"]
    print(f"train cross-entropy {h[0]['train_xent']:.3f} -> {h[-1]['train_xent']:.3f}")
    # Cross-entropy per token (the attention regulariser has a floor of its own).
    assert h[-1]["train_xent"] < 0.6 * h[0]["train_xent"], [round(e["train_xent"], 3) for e in h]
    assert h[-1]["val_xent"] < h[0]["val_xent"]
    for name in ("metrics.json", "loss.png", "config.json", "history.json", "final/model.weights.h5"):
        assert os.path.exists(tmp_path / "job" / name), name
    assert open(tmp_path / "job" / "loss.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path / "job" / "logs" / "train") and os.listdir(tmp_path / "job" / "logs" / "val")
    saved = json.load(open(tmp_path / "job" / "metrics.json"))
    assert saved["steps"] == m["steps"] == 10 * h[0]["step"]


def test_same_command_twice_gives_the_same_losses(small_data, tmp_path):
    a = loop.train(_settings(small_data, tmp_path / "a", "--epochs", "2"))
    b = loop.train(_settings(small_data, tmp_path / "b", "--epochs", "2"))
    assert _losses(a) == _losses(b)
    c = loop.train(_settings(small_data, tmp_path / "c", "--epochs", "2", "--seed", "7"))
    assert _losses(a) != _losses(c)


def test_fused_attention_kernels_train_like_tensorflow_ops(fused_kernels, small_data, tmp_path):
    fused = loop.train(_settings(small_data, tmp_path / "fused", "--epochs", "2", "--attention-kernel", "fused"))
    ops = loop.train(_settings(small_data, tmp_path / "ops", "--epochs", "2", "--attention-kernel", "ops"))
    assert (fused["attention_kernel"], ops["attention_kernel"]) == ("fused", "ops")
    assert (fused["attention_kernel_build"], ops["attention_kernel_build"]) == ("tuned", None)  # built for this CPU
    # Same arithmetic in another order: float rounding apart, the same run.
    np.testing.assert_allclose(_losses(fused), _losses(ops), rtol=1e-4)


def test_step_is_traced_once_whatever_the_caption_lengths(small_data, tmp_path):
    t = loop.Trainer(_settings(small_data, tmp_path / "job", "--epochs", "2"))
    t.run()
    assert t.steps.trace_count() == (1, 1)


@pytest.mark.parametrize("decoder", ["gru", "transformer"])
def test_sigterm_mid_epoch_saves_and_resumes_to_the_same_result(decoder, small_data, tmp_path, monkeypatch):
    flags = ("--epochs", "2", "--checkpoint-every", "0", "--decoder", decoder)
    ref = loop.train(_settings(small_data, tmp_path / "ref", *flags))
    steps_per_epoch = ref["history"][0]["step"]
    kill_at = steps_per_epoch + 3  # in the middle of the second epoch

    t = loop.Trainer(_settings(small_data, tmp_path / "job", *flags))

    def run_with_sigterm():
        original = steps_mod.CaptionSteps.build

        def build(self, spec):
            original(self, spec)
            step = self.train_step

            def step_then_maybe_term(batch):
                out = step(batch)
                if int(tf.convert_to_tensor(self.optimizer.iterations.value)) == kill_at:
                    os.kill(os.getpid(), signal.SIGTERM)  # what a preempted machine gets
                return out
            self.train_step = step_then_maybe_term
        monkeypatch.setattr(steps_mod.CaptionSteps, "build", build)
        return t.run()

    with pytest.raises(loop.Interrupted, match=f"step {kill_at}"):
        run_with_sigterm()
    monkeypatch.undo()
    resumed = loop.train(_settings(small_data, tmp_path / "job", *flags))
    assert resumed["steps"] == ref["steps"]
    assert _losses(resumed) == _losses(ref)
    # Resuming it as the other family is refused in one line, before anything is built.
    other = "gru" if decoder == "transformer" else "transformer"
    with pytest.raises(loop.TrainError, match=f"started with decoder={decoder}, now decoder={other}"):
        loop.Trainer(_settings(small_data, tmp_path / "job", *flags[:-1], other))


def test_vocab_size_that_does_not_match_the_checkpoint_is_refused(small_data, tmp_path):
    job = tmp_path / "job"
    loop.train(_settings(small_data, job, "--epochs", "1", "--max-steps", "2"))
    cfg = json.load(open(job / "config.json"))
    cfg["vocab_size"] += 3
    (job / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "trainer.task", "--data", small_data, "--job-dir", str(job), *SMALL],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "vocab size" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args,words", [
    (["--data", "{empty}", "--job-dir", "{job}"], "no metadata.json"),
    (["--data", "{data}", "--job-dir", "{job}", "--batch-size", "0"], "--batch-size"),
    (["--data", "{data}", "--job-dir", "{job}", "--strategy", "magic"], "--strategy"),
    (["--data", "{data}", "--job-dir", "{job}", "--bucket-boundaries", "20,10"], "--bucket-boundaries"),
    (["--data", "{data}", "--job-dir", "{job}", "--word-dropout", "nan"], "--word-dropout must be a finite number"),
    (["--data", "{data}", "--job-dir", "{job}", "--word-dropout", "1"], "--word-dropout must be below 1.0"),
    (["--data", "{data}", "--job-dir", "{job}", "--precision", "float16"], "--precision"),
])
def test_bad_inputs_one_line_before_training(args, words, small_data, tmp_path, capsys, clean_logging):
    # In-process: the command's main with an argv; the process's own exit is the test below.
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", job=tmp_path / "job", data=small_data) for a in args]
    assert exit_code(task.main, args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert lines and words in lines[-1] and "Traceback" not in err
    assert not os.path.exists(tmp_path / "job" / "checkpoints")


def test_a_bad_input_exits_the_process_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.task", "--data", str(tmp_path), "--job-dir",
                           str(tmp_path / "job")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert lines and "no metadata.json" in lines[-1] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_rerun_finishes_the_same(small_data, tmp_path):
    # No export (nor its evaluation): what is checked is the training the kill interrupted.
    base = [sys.executable, "-m", "trainer.task", "--data", small_data, *SMALL, "--epochs", "4", "--export", "none"]
    ref = subprocess.run(base + ["--job-dir", str(tmp_path / "ref"), "--checkpoint-every", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    job = tmp_path / "job"
    cmd = base + ["--job-dir", str(job), "--checkpoint-every", "3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (job / "checkpoints" / "ckpt-3.index").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no chance to save anything more
    proc.wait()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    a = json.load(open(tmp_path / "ref" / "metrics.json"))
    b = json.load(open(job / "metrics.json"))
    assert b["steps"] == a["steps"]
    np.testing.assert_allclose(b["final_train_loss"], a["final_train_loss"], rtol=1e-6)
    np.testing.assert_allclose(b["final_val_loss"], a["final_val_loss"], rtol=1e-6)


@pytest.mark.parametrize("decoder", ["gru", "transformer"])
def test_bfloat16_trains_and_exports_in_float32(decoder, small_data, tmp_path, monkeypatch):
    from caption_serving import export
    from model import fused_attention
    from model import precision as matmul_precision
    from trainer import precision

    job = tmp_path / "job"
    if decoder == "gru":
        # auto on a machine whose matrix units pass the probe: the job's own step is timed in both
        # precisions (the real timing), and bfloat16 taken (forced: on this CPU it may be slower).
        monkeypatch.delenv(precision.ENV)
        monkeypatch.setattr(matmul_precision, "measure", lambda: matmul_precision.Probe(3.0, "CPU", 0.0))
        monkeypatch.setattr(precision, "STEP_MARGIN", 0.0)
        asked = ["--precision", "auto"]
    else:
        asked = ["--mixed-precision"]   # the shorthand for --precision bfloat16
    m = loop.train(_settings(small_data, job, "--epochs", "3", "--learning-rate", "3e-3", *asked, "--decoder", decoder))
    h = m["history"]
    assert all(np.isfinite(r["train_loss"]) for r in h)
    assert h[-1]["train_xent"] < h[0]["train_xent"]
    assert json.load(open(job / "config.json"))["compute_dtype"] == "bfloat16"
    assert m["precision"]["precision"] == "bfloat16"
    if decoder == "gru":
        assert m["precision"]["speedup"] > 0 and "this job's step measured" in m["precision"]["why"]
        try:   # the fused kernels take bfloat16 too
            fused_attention.load()
            assert m["attention_kernel"] == "fused"
        except fused_attention.KernelError:
            assert m["attention_kernel"] == "ops"
    else:
        assert m["precision"] == {"asked": "bfloat16", "precision": "bfloat16", "why": "asked for", "speedup": None}
        # resumed with auto (the suite pins auto to float32): the job keeps its first run's precision
        again = loop.train(_settings(small_data, job, "--epochs", "4", "--decoder", decoder, "--learning-rate", "3e-3"))
        assert again["epochs_completed"] == 4
        assert again["precision"]["precision"] == "bfloat16" and "first run" in again["precision"]["why"]
    info = export.build_module(str(job))[1]
    assert info["config"]["compute_dtype"] == "float32"


def _twin_steps(jit_a: bool, jit_b: bool, decoder: str = "gru"):
    from model import CaptionerConfig

    config = CaptionerConfig(vocab_size=40, embedding_dim=16, units=32, feature_dim=24, dropout=0.0,
                             gate=decoder == "gru", decoder=decoder)
    rng = np.random.default_rng(3)
    mean, std = rng.normal(0, 1, 24).astype(np.float32), rng.uniform(0.5, 2, 24).astype(np.float32)
    spec = (tf.TensorSpec([None, 64, 24], tf.float16), tf.TensorSpec([None, None], tf.int32))
    pair = []
    for jit in (jit_a, jit_b):
        s = steps_mod.CaptionSteps(config, mean, std, tf.distribute.get_strategy(), 1e-3, 5.0,
                                   jit_compile=jit, attention_kernel="ops")
        s.build(spec)
        pair.append(s)
    pair[1].model.set_weights(pair[0].model.get_weights())
    # A bucket-padded batch, as the trainer feeds the XLA step: captions of 5..11 tokens padded to 11.
    lengths = [11, 5, 9, 7, 11, 6]
    tokens = np.zeros((len(lengths), 11), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = [2] + list(rng.integers(4, 40, n - 2)) + [3]
    features = tf.constant(rng.normal(0, 1, (len(lengths), 64, 24)), tf.float16)
    return pair, (features, tf.constant(tokens))


@pytest.mark.parametrize("decoder", ["gru", "transformer"])
def test_xla_step_computes_the_loss_and_gradients_of_the_graph_step(decoder):
    # XLA runs the padded formulation (static shapes); the graph step packs captions by
    # length. Same loss, same gradient for every variable, to float rounding.
    (xla, graph), batch = _twin_steps(True, False, decoder)
    loss_x, grads_x = xla.loss_and_gradients(batch)
    loss_g, grads_g = graph.loss_and_gradients(batch)
    np.testing.assert_allclose(float(loss_x), float(loss_g), rtol=1e-5)
    for var, gx, gg in zip(xla.model.trainable_variables, grads_x, grads_g):
        scale = float(tf.reduce_max(tf.abs(gg))) + 1e-12
        np.testing.assert_allclose(gx.numpy() / scale, gg.numpy() / scale, atol=2e-5, err_msg=var.path)
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads_g)
    # And the whole step (clip, Adam update) moves both models the same way.
    out_x, out_g = xla.train_step(batch), graph.train_step(batch)
    np.testing.assert_allclose(float(out_x["grad_norm"]), float(out_g["grad_norm"]), rtol=1e-5)
    for a, b in zip(xla.model.get_weights(), graph.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_jit_compile_on_trains_like_the_graph_step_on_bucketed_lengths(small_data, tmp_path):
    # One boundary given: two buckets (under 12 tokens, and up to the longest caption), so XLA compiles
    # the step twice (the default boundaries made six compiles of it here, the test's largest cost).
    common = ("--epochs", "1", "--dropout", "0", "--attention-kernel", "ops", "--no-validate")
    xla = loop.Trainer(_settings(small_data, tmp_path / "xla", *common, "--jit-compile", "on",
                                 "--bucket-boundaries", "12"))
    m_xla = xla.run()
    m_graph = loop.train(_settings(small_data, tmp_path / "graph", *common, "--jit-compile", "off",
                                   "--bucket-boundaries", ",".join(map(str, xla.buckets))))
    assert (m_xla["jit_compile"], m_graph["jit_compile"]) == (True, False)
    np.testing.assert_allclose(_losses(m_xla), _losses(m_graph), rtol=1e-4)
    # Lengths are padded up to the buckets: the compiled step saw at most one length per bucket.
    lengths = {int(t.shape[1]) for _, t in xla._dataset(xla.train_files, 0, shuffle=False)}
    assert lengths <= {b - 1 for b in xla.buckets} and len(lengths) <= len(xla.buckets)


def test_jit_compile_choices():
    assert loop._resolve_jit("off", 1) is False and loop._resolve_jit("on", 1) is True
    # auto: XLA only with one GPU; none here.
    assert loop._resolve_jit("auto", 1) is bool(tf.config.list_logical_devices("GPU"))
    with pytest.raises(loop.TrainError, match="one replica"):
        loop._resolve_jit("on", 2)


def _cut_short(prefix):
    data_file = sorted(glob.glob(prefix + ".data-*"))[0]
    with open(data_file, "r+b") as f:
        f.truncate(os.path.getsize(data_file) // 2)


def test_a_damaged_newest_checkpoint_is_reported_and_the_newest_intact_one_restored(small_data, tmp_path, capsys):
    job = tmp_path / "job"
    args = ("--epochs", "2", "--checkpoint-every", "4", "--keep-checkpoints", "5", "--no-validate")
    loop.train(_settings(small_data, job, *args))
    ckpts = tf.train.get_checkpoint_state(str(job / "checkpoints")).all_model_checkpoint_paths
    newest, older = ckpts[-1], ckpts[-2]
    _cut_short(newest)
    capsys.readouterr()
    m = loop.train(_settings(small_data, job, "--epochs", "3", *args[2:]))
    err = capsys.readouterr().err
    line = next(err_line for err_line in err.splitlines() if err_line.startswith("checkpoint damaged"))
    assert os.path.basename(newest) in line and f"restored {os.path.basename(older)}" in line
    step = int(older.rsplit("-", 1)[1])
    assert f"resuming from {older}: " in err and f"step {step}" in err
    # It trained on from there to the end of epoch 3, like a job that was never damaged.
    clean = loop.train(_settings(small_data, tmp_path / "clean", "--epochs", "3", *args[2:]))
    assert m["steps"] == clean["steps"]
    np.testing.assert_allclose(_losses(m)[-1], _losses(clean)[-1], rtol=1e-4)


def test_no_intact_checkpoint_is_one_line_naming_the_folder(small_data, tmp_path):
    job = tmp_path / "job"
    args = ["--epochs", "1", "--checkpoint-every", "0", "--keep-checkpoints", "2", "--no-validate", "--no-export"]
    loop.train(_settings(small_data, job, *args))
    for prefix in tf.train.get_checkpoint_state(str(job / "checkpoints")).all_model_checkpoint_paths:
        _cut_short(prefix)
    proc = subprocess.run([sys.executable, "-m", "trainer.task", "--data", small_data, "--job-dir", str(job),
                           *SMALL, "--epochs", "2", *args[2:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {job / 'checkpoints'}: no intact checkpoint") and "afresh" in last


def _poison_one_record(data_dir):
    """Rewrite train shard 0 with one image's features set to infinity, as a damaged
    batch would be, and record the new shard in metadata.json as the pipeline would."""
    import dataclasses

    from caption_io import metadata, records
    from pipelines import shards

    meta = metadata.read(data_dir)
    train = meta.splits["train"]
    entry = train.files[0]
    path = entry.path(data_dir)
    recs = records.read_records([path])
    recs[0]["features"] = np.full_like(recs[0]["features"], np.inf)
    writer = shards.ShardWriter(path)
    for r in recs:
        writer.write(records.make_example(r["image_id"], r["file_name"], r["features"], r["captions"],
                                          r["caption_text"], meta.features.shape))
    written = writer.commit()
    entry = dataclasses.replace(entry, **{k: written[k] for k in ("records", "bytes", "sha256")})
    train = dataclasses.replace(train, files=(entry, *train.files[1:]))
    metadata.write(data_dir, dataclasses.replace(meta, splits={**meta.splits, "train": train}))


def test_a_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(small_data, tmp_path):
    import shutil

    data_dir = str(tmp_path / "data")
    shutil.copytree(small_data, data_dir)
    _poison_one_record(data_dir)
    job = tmp_path / "job"
    proc = subprocess.run([sys.executable, "-m", "trainer.task", "--data", data_dir, "--job-dir", str(job), *SMALL,
                           "--epochs", "2", "--checkpoint-every", "1", "--no-validate", "--no-export"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "--learning-rate" in last and "pipelines.validate" in last
    bad_step = int(last.split("step ", 1)[1].split(":", 1)[0])
    saved = tf.train.latest_checkpoint(str(job / "checkpoints"))
    # Nothing saved from the bad state: the newest checkpoint is the step before it, and it is finite.
    if bad_step > 1:
        assert saved and int(saved.rsplit("-", 1)[1]) == bad_step - 1
        assert f"({os.path.basename(saved)}) is intact" in last
        reader = tf.train.load_checkpoint(saved)
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if name.startswith("model/") and np.issubdtype(np.asarray(value).dtype, np.floating):
                assert np.isfinite(value).all(), name
    else:
        assert saved is None and "no checkpoint was written" in last
    assert "non-finite" in subprocess.run([sys.executable, "-m", "pipelines.validate", data_dir, "--full"], cwd=ROOT,
                                          capture_output=True, text=True, timeout=300).stderr


def test_the_best_checkpoint_outlives_the_newest_ones_when_a_run_gets_worse(small_data, tmp_path, capsys,
                                                                            monkeypatch):
    from caption_io import checkpoints
    from caption_serving import export

    job = tmp_path / "job"
    # Forced, not hoped for from a learning rate: epochs 3 and 4 validate 100 worse than they are,
    # so the best is epoch 1 or 2 (by the real losses) on any CPU. Keeping one checkpoint rotates
    # it out of checkpoints/.
    real = loop.Trainer.validate

    def worse_after_two(self, epoch):  # epoch: counted from 0, as the loop passes it
        out = real(self, epoch)
        return {k: v + 100.0 for k, v in out.items()} if epoch >= 2 else out

    monkeypatch.setattr(loop.Trainer, "validate", worse_after_two)
    m = loop.train(_settings(small_data, job, "--epochs", "4", "--keep-checkpoints", "1", "--no-export"))
    monkeypatch.setattr(loop.Trainer, "validate", real)
    best_epoch = min(m["history"], key=lambda h: h["val_loss"])
    assert best_epoch["epoch"] <= 2 and m["history"][-1]["epoch"] == 4
    assert m["best_val_loss"] == best_epoch["val_loss"]
    last = checkpoints.listed(str(job / "checkpoints"))
    best = checkpoints.listed(str(job / "checkpoints" / "best"))
    assert [os.path.basename(p) for p in last] == [f"ckpt-{m['steps']}"]
    assert [os.path.basename(p) for p in best] == [f"ckpt-{best_epoch['step']}"]

    out = str(tmp_path / "best-export")
    assert export.main(["--job-dir", str(job), "--checkpoint", "best", "--output", out]) == 0
    info = json.load(open(os.path.join(out, "assets.extra", "export.json")))
    assert info["checkpoint"] == best[0]
    # The best checkpoint holds the best epoch's weights: its val loss is the recorded best.
    t = loop.Trainer(_settings(small_data, job, "--epochs", "4", "--no-export"))
    t.steps.build(t._dataset(t.val_files, 0, shuffle=False).element_spec)
    t.checkpoint.restore(best[0]).assert_consumed()
    assert t.validate(0)["loss"] == pytest.approx(best_epoch["val_loss"], rel=1e-5)
    capsys.readouterr()
    assert export.main(["--job-dir", str(tmp_path / "nowhere"), "--checkpoint", "best"]) == 2
