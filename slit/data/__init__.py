"""slit.data."""
