"""Virby's watcher processes: the vm worker, the SSH forwarder and the idle monitor."""
