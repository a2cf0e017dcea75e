"""Tests for the captioner."""
