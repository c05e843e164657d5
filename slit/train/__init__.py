"""slit.train."""
