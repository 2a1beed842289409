"""What a request leaves in its ASGI scope for the metrics, the access log and the key check.

`Runtime.infer` puts the resolved version's runner and the parsed call under
SCOPE_CALL, the error handlers the exception under SCOPE_ERROR, the key check
the caller's key under SCOPE_KEY. A module of its own, so that the modules that
write these and those that read them need not import each other.
"""

from __future__ import annotations

from typing import Any

SCOPE_CALL = "framework.call"
SCOPE_ERROR = "framework.error"
SCOPE_KEY = "framework.key"  # the caller's auth.Key, where API keys are on
SCOPE_DISCONNECTED = "framework.disconnected"  # the client left before its body was read

# What a request leaves behind: its version's metric labels and number (UNRESOLVED and
# None where no version was resolved), status, start and end (perf_counter), rows, row
# errors, whether a batch, the name of the exception it raised, its API key, method,
# path, and its bodies (`server.log_payloads`).
Seen = tuple[tuple[str, str, str], Any, int, float, float, int, int, bool, Any, Any, str, str, Any]
