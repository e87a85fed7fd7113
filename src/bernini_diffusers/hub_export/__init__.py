"""Checkpoint conversion, export to a self-contained diffusers folder, and upload to the Hub."""
