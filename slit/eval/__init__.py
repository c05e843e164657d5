"""slit.eval."""
