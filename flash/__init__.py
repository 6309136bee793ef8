"""Imagine Flash core: schedule, samplers, scheduler, model I/O and the shapes-64 family's data."""

__version__ = "0.1.0"
