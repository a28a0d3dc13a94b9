"""Built-in plugins, each registered like a third-party plugin."""
