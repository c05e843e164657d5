"""slit.models.text: frozen text towers (CLIP's text encoder) that embed prompts."""
