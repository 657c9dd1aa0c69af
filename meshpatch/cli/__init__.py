"""The ``meshpatch`` command line (console script ``meshpatch`` → :func:`meshpatch.cli.main.main`)."""
