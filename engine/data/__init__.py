"""Corpus -> vocabulary -> token blocks: everything between the user's text and the model's input."""
