"""Client for kiln serve: run Python functions in kiln microVMs.

Executor implements concurrent.futures.Executor; Client is the lower-level
HTTP API client. Only the standard library is used.
"""

from ._errors import APIError, KilnError, RemoteError, TaskCancelled, TaskFailed
from ._values import decode_value, encode_value, function_payload
from ._client import Client, default_state_dir
from ._executor import Executor

__all__ = [
    "APIError",
    "Client",
    "Executor",
    "KilnError",
    "RemoteError",
    "TaskCancelled",
    "TaskFailed",
    "decode_value",
    "default_state_dir",
    "encode_value",
    "function_payload",
]

__version__ = "0.1.0"
