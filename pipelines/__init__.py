"""Beam pipelines: COCO (or your own captioned images) to sharded TFRecords."""
