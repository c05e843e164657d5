"""slit.interop."""
