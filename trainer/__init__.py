"""Training: the trainer.task command and what it runs (settings, the loop and its actions, input,
distribution, the per-epoch caption metrics, Vertex AI submission). Export, evaluation and
captioning are caption_serving's and caption_eval's."""
