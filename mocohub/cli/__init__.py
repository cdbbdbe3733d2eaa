"""The ``mocohub`` command."""
