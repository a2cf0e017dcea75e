"""Training, export, evaluation and captioning."""
