"""Self-critical sequence training (SCST, Rennie et al. 2017), the trainer's second stage:
after cross-entropy, the captioner is trained on the CIDEr-D of its own sampled captions.

    scorer = cider_d.build_scorer(df_cache_path, lambda: cider_d.read_references(train_files))
    scst = ScstSteps(steps, scorer, max_length=meta.max_tokens - 1, samples=5)
    dist = strategy.distribute_datasets_from_function(
        lambda ctx: image_dataset(train_files, ctx.get_per_replica_batch_size(B), seed=..., input_context=ctx))
    scst.build(dist.element_spec)
    for step, batch in enumerate(dist):
        out = scst.train_step(batch, step_seed(run_seed, global_scst_step))

One step, per replica, for b images:
  1. K captions per image are drawn in the graph with model.decoding.sample (temperature 1,
     up to max_length tokens, <end> included), the image's decoder state computed once and
     shared by its K draws;
  2. their rewards, CIDEr-D against every reference of the image with <end> counted
     (caption_eval.cider_d), are computed on the host through tf.numpy_function;
  3. the baseline of a sample is the mean reward of the image's other K - 1 samples
     ("mean"), or the reward of the image's greedy caption ("greedy");
  4. the loss is sum over samples of (reward - baseline) * -log p(sample), divided by the
     GLOBAL number of sampled tokens (<end> included, every replica counted), the same
     per-token scale as the cross-entropy step (trainer/steps.py): per-replica losses then
     add up to the loss of the whole batch, so 1 and N replicas take the same step for the
     same samples. log p(sample) comes from re-running the decoder with teacher forcing on
     the samples (differentiable; the draw itself is not), with dropout off, so the gradient
     is that of the policy that drew the samples (a test checks the two log-probabilities agree);
  5. with xent_weight W > 0, W times the cross-entropy of the image's reference captions is added:
     every real reference of every image teacher-forced from the image's decoder state (dropout
     off), its per-token -log p summed and divided by the GLOBAL number of reference tokens
     (<end> included, <start> not), the cross-entropy step's scale. The reward alone pulls every
     caption towards the few phrasings that score highest; the reference term pulls towards all
     of the references.

Sampling is stateless: the draws depend only on the seed a step is given and each image's
place in the step's global batch, so a resumed run that passes the same (run seed, step) draws
the same captions, and N replicas on one machine (each a slice of the global batch) draw what
one device draws (model.decoding.sample's `rows`) and take the same step. Exact resume then
needs the model, `ScstSteps.optimizer` (its own Adam, apart from the cross-entropy one) and
the loop's counters in the checkpoint; dropout is off here, so no RNG state is involved.
"""
from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from caption_eval import cider_d
from caption_io import records
from caption_io.vocab import START_ID
from model import decoding, losses
from trainer.steps import CaptionSteps, StepAdam

BASELINES = ("mean", "greedy")
# W of the reference captions' cross-entropy in the loss (docstring, 5.). 0.7 kept 95% of pure
# SCST's CIDEr gain on the demo's scenes with 7 openings and 82% distinct captions, where W = 0
# left one opening (docs/benchmarks.md, "Composition and variety").
XENT_WEIGHT = 0.7


# ------------------------------------------------------------------------------------ input
def image_dataset(files: list[str], batch_size: int, *, feature_shape=None, shuffle: bool = True,
                  seed: int = 0, shuffle_buffer: int = 256, input_context: tf.distribute.InputContext | None = None,
                  read_batch: int = 32, prefetch: int = 2) -> tf.data.Dataset:
    """Batches of whole images for SCST, each image once an epoch (the cross-entropy data is one
    row per caption, but a reward needs all of an image's references at once):
    (features [B, positions, channels] float16, references [B, C, L] int32, reference_counts [B] int32);
    feature_shape: the data directory's (None: read from the metadata.json beside the shards).

    references holds every caption of an image as stored (<start> ... <end>), zero-padded to the
    batch's most captions C and longest caption L; reference_counts says how many rows of an
    image are real (a zero row would otherwise count as an empty reference and lower its CIDEr-D).
    Dense rather than ragged, so the batches go through tf.distribute and tf.numpy_function as
    they are. Deterministic for a seed: file order and shuffle are seeded, so an epoch can be
    resumed by skipping the batches already trained on.
    """
    files = list(files)
    feature_shape = feature_shape or records.beside(files)
    pipelines = input_context.num_input_pipelines if input_context else 1
    ds = tf.data.Dataset.from_tensor_slices(files)
    by_file = pipelines > 1 and len(files) >= pipelines
    if by_file:  # each input pipeline reads its own files when there are enough of them
        ds = ds.shard(pipelines, input_context.input_pipeline_id)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed)
    cycle = min(len(files), 8)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=cycle, num_parallel_calls=cycle, deterministic=True)
    if pipelines > 1 and not by_file:  # else its own records
        ds = ds.shard(pipelines, input_context.input_pipeline_id)

    def per_image(serialized):
        parsed = records.parse_examples(serialized, feature_shape)
        captions = parsed["captions"]
        return tf.data.Dataset.from_tensor_slices(
            (parsed["features"], captions.to_tensor(), tf.cast(captions.row_lengths(), tf.int32)))

    ds = ds.batch(read_batch).flat_map(per_image)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    ds = ds.padded_batch(batch_size, padded_shapes=([*feature_shape], [None, None], []))
    # Autotuning off, as in trainer/data.py (its autotuner delayed the end of every epoch).
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(prefetch).with_options(options)


def reference_sets(references: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """The dense references of a batch back as one [captions, L] array per image (real rows only),
    the reference sets cider_d scores against (trailing zeros are not words, so they stay)."""
    return [references[i, :int(n)] for i, n in enumerate(counts)]


def step_seed(run_seed: int, step: int) -> tf.Tensor:
    """The sampling seed of one SCST step: a function of the run's seed and the global step only,
    so a resumed run draws the same captions at the same step."""
    return tf.constant([run_seed, step], tf.int64)


# ------------------------------------------------------------------------------------- step
class _SharedImageState:
    """The model as model.decoding sees it, for K draws per image: the decoder state of each image
    is computed once (the encoder and the decoder's per-image work) and repeated K times, where sampling from
    K-fold repeated features would run the encoder B*K times. decoding reads its features' shape
    (rows, positions) and hands them to init_state, so it is given a zero-width [B*K, P, 0]."""

    def __init__(self, model, state):
        self.model, self.state, self.config = model, state, model.config

    def init_state(self, features):
        del features  # only its shape mattered, to decoding
        return self.state

    def step(self, state, prev_tokens):
        return self.model.step(state, prev_tokens)

    def reorder(self, state, rows):
        return self.model.reorder(state, rows)

    def state_invariants(self, state):
        return self.model.state_invariants(state)


def _repeat_state(state, k: int):
    """Each image's decoder state K times, image-major (rows i*K .. i*K + K-1 are image i)."""
    return tf.nest.map_structure(lambda x: tf.repeat(x, k, axis=0), state)


class ScstSteps:
    """The compiled SCST train step over a CaptionSteps' model and strategy.

    samples: K captions drawn per image (>= 2 for the "mean" baseline). max_length: the most
    tokens a draw may have, <end> included (the cross-entropy data's longest caption less its
    <start>: metadata max_tokens - 1). baseline: "mean" (leave-one-out over the other K - 1) or
    "greedy" (the greedy caption's reward, one more decode a step). learning_rate: of this stage's
    own Adam (SCST wants a far smaller rate than cross-entropy). clip_norm: the global gradient
    norm clip, the cross-entropy step's when None. xent_weight: W of the reference captions'
    cross-entropy added to the loss (module docstring, 5.); 0 leaves it out of the step's graph."""

    def __init__(self, steps: CaptionSteps, scorer: cider_d.CiderD, *, max_length: int, samples: int = 5,
                 baseline: str = "mean", learning_rate=5e-5, clip_norm: float | None = None,
                 temperature: float = 1.0, xent_weight: float = XENT_WEIGHT):
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if samples < (2 if baseline == "mean" else 1):
            raise ValueError(f"samples must be >= 2 for the leave-one-out baseline, got {samples}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if not xent_weight >= 0:
            raise ValueError(f"xent_weight must be >= 0, got {xent_weight}")
        self.model, self.strategy, self.scorer = steps.model, steps.strategy, scorer
        self.fused_attention = steps.fused_attention
        self.samples, self.max_length, self.baseline = samples, max_length, baseline
        self.temperature = temperature
        self.xent_weight = float(xent_weight)
        self.clip_norm = steps.clip_norm if clip_norm is None else clip_norm
        with self.strategy.scope():
            self.optimizer = StepAdam(learning_rate=learning_rate, name="scst_adam")
            self.optimizer.build(self.model.trainable_variables)
        self.train_step, self._replica_batch = None, None
        self._greedy = tf.function(self._greedy_tokens, reduce_retracing=True, autograph=False)

    # -------------------------------------------------------------- the pieces of a step
    def draw(self, features, seed, first_image=0, batch_images=None):
        """K sampled captions per image: (tokens [b*K, T] int32, image-major, <pad> after <end>;
        lengths [b*K] int32, <end> included; the sampler's log-probabilities [b*K]).

        first_image, batch_images: these b images are images first_image.. of a global batch of
        batch_images (a replica's share): the draws of an image depend on the seed and its place
        in the global batch, not on the split (default: the whole batch, b images)."""
        state = _repeat_state(self.model.init_state(features), self.samples)
        rows = tf.shape(features)[0] * self.samples
        shape_only = tf.zeros([rows, features.shape[1], 0], features.dtype)
        placed = None if batch_images is None else (first_image * self.samples, batch_images * self.samples)
        out = decoding.sample(_SharedImageState(self.model, state), shape_only, self.max_length,
                              temperature=self.temperature, seed=seed, rows=placed)
        return out.tokens, out.lengths, out.scores

    def sequence_nll(self, features, tokens, image_state=None):
        """-log p(caption | image) of each sampled caption ([b*K], <end> included, nothing after
        it), from teacher forcing: the differentiable path to the weights that sampling is not.
        Packed by length (trainer/steps.py's fast path), so a short draw costs only its steps.
        image_state: the images' decoder state when the caller has it (computed from features if not)."""
        if image_state is None:
            image_state = self.model.init_state(features)
        state = _repeat_state(image_state, self.samples)
        rows = tf.shape(tokens)[0]
        inputs = tf.concat([tf.fill([rows, 1], START_ID), tokens[:, :-1]], 1)
        packed = self.model.decoder.packed_teacher_forced(state, inputs, tokens, training=False,
                                                          fused=self.fused_attention)
        token_nll = losses.sparse_xent(self.model.decoder.logits(packed.outputs), packed.targets)
        return tf.math.unsorted_segment_sum(token_nll, packed.caption, rows)

    def rewards(self, tokens, lengths, references, counts, greedy_tokens=None, greedy_lengths=None):
        """(rewards [b, K], baselines [b, K] float32, host seconds spent scoring) on the host: CIDEr-D
        of every draw against its image's references, and the baseline of each (module docstring)."""
        greedy = greedy_tokens is not None
        if not greedy:
            greedy_tokens = tf.zeros([0, 0], tf.int32)
            greedy_lengths = tf.zeros([0], tf.int32)
        rewards, baselines, seconds = tf.numpy_function(
            self._score, [tokens, lengths, references, counts, greedy_tokens, greedy_lengths],
            [tf.float32, tf.float32, tf.float32], stateful=False)
        images = tf.shape(counts)[0]
        return (tf.reshape(rewards, [images, self.samples]), tf.reshape(baselines, [images, self.samples]),
                tf.reshape(seconds, []))

    def _score(self, tokens, lengths, references, counts, greedy_tokens, greedy_lengths):
        """The numpy side of `rewards`: references prepared once for the batch, then the draws (and the
        greedy captions) scored against them; the time taken is returned, for the reward's share."""
        start = time.perf_counter()
        b, k = counts.shape[0], self.samples
        if b == 0:  # a replica's share of a short last batch can be empty
            empty = np.zeros([0, k], np.float32)
            return empty, empty, np.float32(time.perf_counter() - start)
        prepared = self.scorer.references(reference_sets(references, counts))
        rewards = self.scorer.score_samples(tokens.reshape(b, k, -1), prepared, lengths=lengths.reshape(b, k))
        if greedy_tokens.shape[0]:
            baselines = np.repeat(self.scorer.score(greedy_tokens, prepared, lengths=greedy_lengths)[:, None], k, 1)
        else:
            baselines = cider_d.leave_one_out_baseline(rewards)
        return (rewards.astype(np.float32), baselines.astype(np.float32),
                np.float32(time.perf_counter() - start))

    def surrogate_loss(self, features, tokens, advantages, global_tokens, image_state=None):
        """The SCST loss of one replica's draws: sum(advantage * -log p(draw)) / global_tokens,
        advantages [b*K] held constant. Summed over replicas it is the whole batch's loss."""
        nll = self.sequence_nll(features, tokens, image_state)
        return tf.reduce_sum(tf.stop_gradient(advantages) * nll) / tf.maximum(tf.cast(global_tokens, tf.float32), 1.0)

    @staticmethod
    def reference_rows(references, counts):
        """The real rows of a batch's references [b, C, L] as [R, L], image-major (R = sum of counts):
        rows past an image's count are padding and are dropped, not scored."""
        return tf.boolean_mask(references, tf.sequence_mask(counts, tf.shape(references)[1]))

    @staticmethod
    def reference_tokens(references, counts):
        """The reference tokens the cross-entropy term is a mean over: every real row's targets
        (all but <start>), <end> included, padding not (an int64 scalar)."""
        return tf.math.count_nonzero(ScstSteps.reference_rows(references, counts)[:, 1:], dtype=tf.int64)

    def reference_xent(self, features, references, counts, global_tokens, image_state=None):
        """The summed per-token -log p of one replica's real references (<start> ... <end>, teacher
        forced from their image's decoder state, dropout off) over global_tokens, the reference
        tokens of every replica: summed over replicas it is the whole batch's per-token
        cross-entropy. Packed by length, as sequence_nll is."""
        if image_state is None:
            image_state = self.model.init_state(features)
        # Image i's state counts[i] times: one row per real reference, in reference_rows' order.
        state = tf.nest.map_structure(lambda x: tf.repeat(x, counts, axis=0), image_state)
        rows = self.reference_rows(references, counts)
        packed = self.model.decoder.packed_teacher_forced(state, rows[:, :-1], rows[:, 1:], training=False,
                                                          fused=self.fused_attention)
        # The cross-entropy stage's own packed loss, without the attention regulariser.
        return losses.packed_caption_loss(self.model.decoder.logits(packed.outputs), packed.targets, packed.attention,
                                          packed.caption, tf.shape(rows)[0], 0.0, global_tokens).xent

    def _greedy_tokens(self, features):
        out = decoding.greedy(self.model, features, self.max_length)
        return out.tokens, out.lengths

    # -------------------------------------------------------------- the compiled step
    def _replica_train(self, features, references, counts, seed):
        ctx = tf.distribute.get_replica_context()
        if self._replica_batch is None:
            tokens, lengths, _ = self.draw(features, seed)
        else:  # the replica's images are a slice of the global batch: draw as one device would
            tokens, lengths, _ = self.draw(features, seed, ctx.replica_id_in_sync_group * self._replica_batch,
                                           ctx.num_replicas_in_sync * self._replica_batch)
        greedy = self._greedy_tokens(features) if self.baseline == "greedy" else (None, None)
        rewards, baselines, seconds = self.rewards(tokens, lengths, references, counts, *greedy)
        advantages = tf.reshape(rewards - baselines, [-1])
        local_tokens = tf.reduce_sum(tf.cast(lengths, tf.int64))
        # Divided by the GLOBAL token count, so the replicas' losses and gradients add up to the
        # whole batch's (trainer/steps.py does the same for cross-entropy).
        global_tokens = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_tokens)
        variables = self.model.trainable_variables
        with_xent = self.xent_weight > 0  # a Python test: with W = 0 the term is not in the graph
        if with_xent:
            global_refs = ctx.all_reduce(tf.distribute.ReduceOp.SUM, self.reference_tokens(references, counts))
        with tf.GradientTape() as tape:
            if with_xent:  # the images' decoder state once, for the draws' and the references' teacher forcing
                image_state = self.model.init_state(features)
                xent = self.reference_xent(features, references, counts, global_refs, image_state)
                loss = (self.surrogate_loss(features, tokens, advantages, global_tokens, image_state)
                        + self.xent_weight * xent)
            else:
                loss = self.surrogate_loss(features, tokens, advantages, global_tokens)
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        grads, norm = tf.clip_by_global_norm(grads, self.clip_norm)
        self.optimizer.apply_gradients(zip(grads, variables))
        out = (loss, tf.reduce_sum(tf.cast(rewards, tf.float64)), tf.reduce_sum(tf.cast(baselines, tf.float64)),
               tf.cast(tf.size(lengths), tf.int64), local_tokens, tf.cast(seconds, tf.float64), norm)
        return out + (xent,) if with_xent else out

    def build(self, element_spec, replica_batch: int | None = None) -> None:
        """Compile the step for batches shaped like `element_spec` (image_dataset's, or a distributed
        one's). train_step(batch, seed [2] int64) -> {loss, reward, baseline, length (mean tokens of
        a draw, <end> included), samples, tokens (global), reward_seconds (host time scoring, summed
        over replicas), grad_norm, xent (the reference captions' per-token cross-entropy, unweighted:
        loss holds xent_weight times it; 0 with xent_weight 0)}.

        replica_batch: the images of a full batch on one replica, with several replicas: replica r's
        images are then taken as images r * replica_batch.. of the step's global batch, as they are
        where one input pipeline feeds the replicas in turn (one machine), so the step draws and
        updates exactly as one device does on the whole batch."""
        strategy = self.strategy
        self._replica_batch = replica_batch if strategy.num_replicas_in_sync > 1 else None

        def total(v):
            return strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)

        @tf.function(input_signature=[element_spec, tf.TensorSpec([2], tf.int64)], autograph=False)
        def train_step(batch, seed):
            out = strategy.run(self._replica_train, args=(*batch, seed))
            loss, reward, baseline, samples, tokens, seconds = [total(v) for v in out[:6]]
            n = tf.maximum(tf.cast(samples, tf.float64), 1.0)
            return {"loss": loss, "reward": reward / n, "baseline": baseline / n,
                    "length": tf.cast(tokens, tf.float64) / n, "samples": samples, "tokens": tokens,
                    "reward_seconds": seconds,
                    "grad_norm": strategy.reduce(tf.distribute.ReduceOp.MEAN, out[6], axis=None),
                    "xent": total(out[7]) if self.xent_weight > 0 else tf.constant(0.0)}

        self.train_step = train_step

    # -------------------------------------------------------------- validation
    def greedy_cider(self, dataset, scorer: cider_d.CiderD) -> float:
        """Mean CIDEr-D of the greedy caption of every image of an image_dataset (not distributed):
        the figure SCST should raise (TensorBoard's val scalar). Score it with count_end=False to
        match the evaluation's CIDEr."""
        scores = []
        for features, references, counts in dataset:
            tokens, lengths = self._greedy(features)
            refs = reference_sets(references.numpy(), counts.numpy())
            scores.append(scorer.score(tokens.numpy(), refs, lengths=lengths.numpy()))
        return float(np.mean(np.concatenate(scores))) if scores else float("nan")
