"""Placeholder until the prompt-tuning plugin lands: declares no method."""

plugin = object()
