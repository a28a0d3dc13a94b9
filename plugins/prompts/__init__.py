"""Built-in prompts plugins."""
