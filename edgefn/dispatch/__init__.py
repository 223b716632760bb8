"""The event's path inside the daemon: route it to its functions' lanes, let each lane's workers run
it in the sandbox, and release the answers in arrival order per lane (docs/architecture.md)."""
