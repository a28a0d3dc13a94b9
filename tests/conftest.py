"""Shared fixtures: the chatstream test kit (chatstream.testing) is loaded as a pytest plugin."""
