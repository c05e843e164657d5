"""The real demo: real audio sources, the recipe run end to end (slit demo)."""
