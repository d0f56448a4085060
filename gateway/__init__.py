"""Sluis gateway: an OpenAI-compatible, multi-tenant front door for hosted models."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
