"""Running edgefn as a system service: systemd's notify protocol (`notify.py`: ready, watchdog, stopping)
and the files that make the service and the command that installs them (`install.py`, `files/`)."""
