"""slit.models."""
