"""A free TCP port for each multi-process launch's `--main_process_port`: the suite runs on several
pytest-xdist workers at once, and two launches on one fixed port would meet in one rendezvous."""

import socket


def free_port() -> str:
    """A port no process holds now, as a command line takes it. The kernel picks it (bind to port 0),
    so workers asking at the same time get different ones."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])
