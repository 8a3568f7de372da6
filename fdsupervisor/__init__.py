"""fdsupervisor: a socket-activation supervisor with a named-FD store and a QMP monitor."""

__version__ = "0.1.0"
