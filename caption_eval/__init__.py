"""Evaluation: a captioned split scored by evaluators (COCO caption metrics, attention
correctness, exact objects) and the gallery (imports caption_io and caption_serving)."""
