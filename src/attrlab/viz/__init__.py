"""Presentation: HTML rendering (escaped), plots and the report."""
