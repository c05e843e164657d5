"""slit.models.audio."""
