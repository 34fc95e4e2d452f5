"""Client for kiln serve: run Python functions in kiln microVMs.

Executor implements concurrent.futures.Executor; Client is the lower-level
HTTP API client; ShellFunction runs shell commands. Only the standard
library is used.
"""

from ._capture import CaptureError
from ._client import Client, default_state_dir
from ._errors import ERROR_CODES, APIError, KilnError, RemoteError, TaskCancelled, TaskFailed
from ._executor import Executor
from ._shell import ShellFunction, ShellResult
from ._values import decode_value, encode_value, function_payload

__all__ = [
    "APIError",
    "CaptureError",
    "Client",
    "ERROR_CODES",
    "Executor",
    "KilnError",
    "RemoteError",
    "ShellFunction",
    "ShellResult",
    "TaskCancelled",
    "TaskFailed",
    "decode_value",
    "default_state_dir",
    "encode_value",
    "function_payload",
]

__version__ = "0.2.0"
