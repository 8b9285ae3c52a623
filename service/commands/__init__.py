"""One module per ``bandit-router`` sub-command, registered in :mod:`service.cli`."""
