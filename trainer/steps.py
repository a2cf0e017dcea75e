"""The single-replica view of training: model, optimizer, loss, and the
compiled train and eval steps that run it under a tf.distribute strategy.

The loop (trainer/loop.py) feeds these steps; benchmarks call them directly.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from model import Captioner, CaptionerConfig, caption_loss, fused_attention


class StepAdam(keras.optimizers.Adam):
    """Keras Adam, with two changes for the train step:

    - The step all-reduces the gradients itself, so that clipping sees the global gradient
      (Keras clips per replica, before its own all-reduce, which would make 2 replicas clip
      differently from 1 device). The second all-reduce is skipped.
    - Each variable is updated by TensorFlow's fused Adam kernel (ResourceApplyAdam: one
      pass over var, m, v and the gradient) instead of Keras's eight separate elementwise
      ops, each a pass over memory (less than half the optimizer's time a step on a CPU:
      docs/ARCHITECTURE.md). Same formula (alpha = lr *
      sqrt(1 - b2^t) / (1 - b1^t); m, v moving averages; var -= alpha m / (sqrt v + eps));
      tests/test_trainer.py checks it against keras.optimizers.Adam.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return grads_and_vars

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        # Inside strategy.extended.update a mirrored slot's .handle is this device's copy.
        m, v = (s.value.handle for s in (self._momentums[index], self._velocities[index]))
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m, v=v,
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype),
            beta2=tf.cast(self.beta_2, dtype), epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype))


class CaptionSteps:
    def __init__(self, config: CaptionerConfig, feature_mean, feature_std, strategy: tf.distribute.Strategy,
                 learning_rate, clip_norm: float, jit_compile: bool = False, attention_kernel: str = "auto"):
        """attention_kernel: auto | fused | ops, see model.fused_attention.resolve (raises
        fused_attention.KernelError for 'fused' where the kernels cannot serve)."""
        self.config = config
        # XLA cannot compile the kernels (custom ops): the jit path keeps TensorFlow ops.
        self.fused_attention = (not jit_compile
                                and fused_attention.resolve(attention_kernel, config.compute_dtype, config.decoder))
        self.strategy = strategy
        self.clip_norm = clip_norm
        self.jit_compile = jit_compile
        with strategy.scope():
            self.model = Captioner(config, feature_mean, feature_std)
            self.optimizer = StepAdam(learning_rate=learning_rate, name="adam")
            self.optimizer.build(self.model.trainable_variables)
        self.train_step = None
        self.eval_step = None
        self._grads = None

    def _replica_loss(self, features, tokens, training):
        targets = tokens[:, 1:]
        ctx = tf.distribute.get_replica_context()
        local_tokens = tf.math.count_nonzero(targets, dtype=tf.int64)
        # The loss is summed over tokens and divided by the GLOBAL token count, so
        # summing replicas gives the same number on 1 or 8 of them.
        global_tokens = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_tokens)
        if self.jit_compile:  # XLA needs static shapes: the padded formulation
            logits, attention = self.model.teacher_forced(features, tokens, training=training)
            parts = caption_loss(logits, targets, attention, self.config.attention_reg,
                                 global_token_count=global_tokens)
        else:
            # Captions packed by length: padded positions cost nothing, in the time
            # loop or in the vocabulary projection. Same loss and gradients.
            parts = self.model.teacher_forced_loss(features, tokens, training=training,
                                                   global_token_count=global_tokens,
                                                   fused_attention=self.fused_attention)
        return parts, local_tokens

    def _replica_grads(self, features, tokens):
        with tf.GradientTape() as tape:
            parts, ntok = self._replica_loss(features, tokens, True)
        grads = tape.gradient(parts.loss, self.model.trainable_variables)
        grads = [tf.convert_to_tensor(g) for g in grads]  # embedding: IndexedSlices -> dense for all_reduce
        return parts, ntok, grads

    def _replica_train(self, features, tokens):
        parts, ntok, grads = self._replica_grads(features, tokens)
        variables = self.model.trainable_variables
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        grads, norm = tf.clip_by_global_norm(grads, self.clip_norm)
        self.optimizer.apply_gradients(zip(grads, variables))
        return parts.loss, parts.xent, parts.reg, ntok, norm

    def _replica_eval(self, features, tokens):
        parts, ntok = self._replica_loss(features, tokens, False)
        return parts.loss, parts.xent, parts.reg, ntok

    def build(self, element_spec) -> None:
        """Compile the steps for batches shaped like `element_spec`
        ((features, tokens), or a distributed dataset's element_spec)."""
        strategy = self.strategy
        replica_train = self._replica_train
        if self.jit_compile:
            # XLA fuses the per-step loop body; collectives stay outside the
            # compiled cluster, so it is offered for single-replica runs only.
            if strategy.num_replicas_in_sync > 1:
                raise ValueError("jit_compile is supported with one replica only")
            replica_train = tf.function(self._replica_train, jit_compile=True, autograph=False)

        def total(v):
            return strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)

        # One trace for every batch: the signature leaves batch and caption length open. The steps
        # are TensorFlow ops and explicit loops, so autograph has nothing to convert: without it a
        # small job's first step traces in about half the time.
        @tf.function(input_signature=[element_spec], autograph=False)
        def train_step(batch):
            out = strategy.run(replica_train, args=batch)
            loss, xent, reg, ntok = [total(v) for v in out[:4]]
            norm = strategy.reduce(tf.distribute.ReduceOp.MEAN, out[4], axis=None)
            return {"loss": loss, "xent": xent, "reg": reg, "tokens": ntok, "grad_norm": norm}

        @tf.function(input_signature=[element_spec], autograph=False)
        def eval_step(batch):
            loss, xent, reg, ntok = [total(v) for v in strategy.run(self._replica_eval, args=batch)]
            return {"loss": loss, "xent": xent, "reg": reg, "tokens": ntok}

        self.train_step, self.eval_step = train_step, eval_step
        # The train step's loss and gradients before the update, compiled as the step compiles
        # them (for checking the XLA step against the graph step).
        self._grads = tf.function(self._replica_grads, jit_compile=self.jit_compile or None, autograph=False)

    def loss_and_gradients(self, batch):
        """(loss, [gradient per trainable variable]) of one batch, without updating (one replica)."""
        if self.strategy.num_replicas_in_sync != 1:
            raise ValueError("loss_and_gradients is for one replica")
        parts, _, grads = self._grads(*batch)
        return parts.loss, grads

    def trace_count(self) -> tuple[int, int]:
        return (self.train_step.experimental_get_tracing_count(), self.eval_step.experimental_get_tracing_count())
