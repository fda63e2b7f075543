"""The vfkit backend (macOS): backend.py (the Backend), rest.py (its REST API client),
provision.py (MAC, key share) and leases.py (the DHCP lease fallback)."""

from virby.workers.backends.vfkit.backend import VfkitBackend

__all__ = ["VfkitBackend"]
