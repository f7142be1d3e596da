"""``python -m dashscope_simulator``: the simulator in the foreground (see ``server.main``)."""

from .server import main

main()
