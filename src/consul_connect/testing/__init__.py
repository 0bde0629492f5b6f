"""Helpers for testing code that uses consul-connect.

:class:`TestCA` issues Consul-shaped roots and leaves in memory (plus deliberately
wrong certificates as :class:`BadCert`), so tests need no Consul agent.
"""

from __future__ import annotations

from .ca import BadCert, TestCA

__all__ = ["BadCert", "TestCA"]
