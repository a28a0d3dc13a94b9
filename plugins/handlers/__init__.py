"""Built-in handlers plugins."""
