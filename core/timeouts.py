"""Deadlines the workers keep when they are told to stop. Each watcher's graceful timeout in
the circus ini is built from these (core/watchers.py), so circus never kills a worker that is
still inside its own deadline."""

VM_SHUTDOWN_TIMEOUT = 30  # a clean guest power-off, then the hypervisor is killed
FORWARDER_DRAIN_TIMEOUT = 30  # open sessions may finish, then they are cut
