"""What leaves the engine: metric and config exports, the Hugging Face export, checkpoint inspection."""
