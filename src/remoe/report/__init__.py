"""Report stage: run directories -> paper-style tables and figures (reads files only, never live objects)."""

from .build import build_report

__all__ = ["build_report"]
