"""Drop-in replacements for the helpers other projects hand-roll today."""
