"""One training process for the distribution tests (run as a subprocess:
logical devices and TF_CONFIG must be set before TensorFlow starts).

    python -m tests.dist_worker MODE DATA_DIR JOB_DIR OUT_NPZ [--export] [--scst] [--transformer]
MODE: default | mirrored (two logical CPU devices) | multi_worker (TF_CONFIG set by the caller)
--export: end as trainer.task does (the chief exports; evaluation off); OUT_NPZ's
`exported` holds the path this process exported, or "".
--scst: one epoch of cross-entropy (9 steps), then 2 SCST steps (instead of 3 cross-entropy steps).
--transformer: the Transformer decoder (two heads) instead of the GRU.
"""
import json
import sys

import numpy as np
import tensorflow as tf


def main():
    mode, data_dir, job_dir, out = sys.argv[1:5]
    export, scst, transformer = ("--export" in sys.argv[5:], "--scst" in sys.argv[5:],
                                 "--transformer" in sys.argv[5:])
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from trainer import loop, task

    s = task.parse_args(["--data", data_dir, "--job-dir", job_dir, "--units", "64", "--embedding-dim", "32",
                         "--batch-size", "8", "--dropout", "0", "--epochs", "1", "--max-steps", "11" if scst else "3",
                         "--strategy", mode, "--no-validate", "--no-progress", "--seed", "4", "--no-eval"]
                        + ([] if export else ["--no-export"])
                        + (["--decoder", "transformer"] if transformer else [])
                        + (["--scst-epochs", "1", "--scst-samples", "3", "--scst-learning-rate", "1e-3"]
                           if scst else []))
    t = loop.Trainer(s)
    t.run()
    exported = task.finish(t, s) or ""
    np.savez(out, replicas=t.strategy.num_replicas_in_sync, steps=t.global_step(), exported=exported,
             scst_steps=int(t.scst_steps), history=json.dumps(t.history),
             **{v.path.replace("/", "__"): np.asarray(tf.convert_to_tensor(v.value))
                for v in t.model.trainable_variables})


if __name__ == "__main__":
    main()
