"""gunicorn config: start the test reporter in every worker (after fork, as any
per-worker client must be)."""


def post_fork(server, worker):
    import mpreport

    mpreport.start()
