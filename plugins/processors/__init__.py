"""Built-in processors plugins."""
