"""Built-in transports plugins."""
