"""Logging, tracing and metrics set-up for toolbus processes."""

from .logging import configure_logging

__all__ = ["configure_logging"]
