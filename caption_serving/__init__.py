"""Serving: the SavedModel export, the client that loads and calls it, the `caption`
command and the attention plots (imports caption_io and model only)."""
