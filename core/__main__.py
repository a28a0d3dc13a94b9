"""``python -m chatstream`` runs the ``chatstream`` command."""

from .cli import main

main()
