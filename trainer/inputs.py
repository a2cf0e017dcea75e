"""The job's datasets, distributed over its replicas: an epoch of captions (training or
validation) and an epoch of SCST images. Each epoch's order is fixed by (--seed, epoch), so a
resumed epoch skips exactly the batches it had trained and goes on with the ones an
uninterrupted run would have seen.
"""
from __future__ import annotations

from trainer import data
from trainer.settings import Settings


class Inputs:
    def __init__(self, s: Settings, strategy, feature_shape, train_files: list[str], buckets, pad_to_bucket: bool):
        self.s, self.strategy, self.feature_shape = s, strategy, feature_shape
        self.train_files, self.buckets, self.pad_to_bucket = train_files, buckets, pad_to_bucket

    def _seed(self, epoch: int) -> int:
        return self.s.seed * 1000 + epoch

    def captions(self, files, epoch: int, shuffle: bool, skip: int = 0):
        """(features, tokens) batches of `files`' captions, the first `skip` left out."""
        s = self.s

        def fn(ctx):
            ds = data.caption_dataset(
                files, ctx.get_per_replica_batch_size(s.batch_size) if ctx else s.batch_size,
                feature_shape=self.feature_shape, shuffle=shuffle, seed=self._seed(epoch),
                shuffle_buffer=s.shuffle_buffer, bucket_boundaries=self.buckets, input_context=ctx,
                pad_to_bucket=self.pad_to_bucket)
            return ds.skip(skip) if skip else ds

        return self.strategy.distribute_datasets_from_function(fn)

    def scst_images(self, epoch: int, skip: int = 0):
        """The training images for an SCST epoch, the first `skip` batches left out."""
        from trainer import scst

        s = self.s

        def fn(ctx):
            ds = scst.image_dataset(self.train_files, ctx.get_per_replica_batch_size(s.batch_size) if ctx else
                                    s.batch_size, feature_shape=self.feature_shape, seed=self._seed(epoch),
                                    input_context=ctx)
            return ds.skip(skip) if skip else ds

        return self.strategy.distribute_datasets_from_function(fn)
