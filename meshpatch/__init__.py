"""meshpatch: a zero-code proxyless service-mesh agent for Python.

This package must stay import-cheap: the process-start hook imports it in
every interpreter where the agent is enabled, so nothing heavy lives here.
"""

__version__ = "0.1.0"
