"""consul-connect: Connect-native Consul service mesh for Python services, no sidecar."""

from __future__ import annotations

__version__ = "0.1.0"
