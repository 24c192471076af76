"""Presets: plain files of assignments, each filling in the settings a user left alone."""
