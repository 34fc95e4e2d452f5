"""Encoding of functions, arguments and results (the agent's task.Value format)."""

import base64
import inspect
import math
import pickle
import textwrap

from ._errors import KilnError


def _jsonable(v, depth=0):
    # Exactly the values JSON gives back with the same types (a tuple comes
    # back as a list): the same rule as the guest agent.
    if depth > 100:
        return False
    t = type(v)
    if v is None or t is bool or t is int or t is str:
        return True
    if t is float:
        return math.isfinite(v)
    if t is list or t is tuple:
        return all(_jsonable(x, depth + 1) for x in v)
    if t is dict:
        return all(type(k) is str and _jsonable(x, depth + 1) for k, x in v.items())
    return False


def encode_value(v):
    """Encode v as {"enc": "json", "data": v} or a base64 pickle."""
    if _jsonable(v):
        return {"enc": "json", "data": v}
    try:
        data = pickle.dumps(v, protocol=pickle.DEFAULT_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - any pickling failure
        raise KilnError("cannot send %r: it is not JSON and pickle failed: %s" % (type(v).__name__, e)) from e
    return {"enc": "pickle", "data": base64.b64encode(data).decode("ascii")}


def decode_value(d):
    """Decode a task.Value dict."""
    if d is None:
        return None
    enc = d.get("enc")
    if enc == "json":
        return d.get("data")
    if enc == "pickle":
        return pickle.loads(base64.b64decode(d["data"]))
    raise KilnError("unknown value encoding %r" % (enc,))


def _source_of(fn):
    """Return (source, None) when fn can be sent by source, else (None, reason)."""
    if not inspect.isfunction(fn):
        return None, "not a plain function"
    if fn.__name__ == "<lambda>":
        return None, "a lambda"
    if fn.__closure__:
        return None, "a closure"
    if inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn):
        return None, "not a plain function"
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        return None, "no source (%s)" % e
    if not src.lstrip().startswith("def "):
        return None, "decorated"
    try:
        code = compile(src, "<kiln>", "exec")
    except SyntaxError as e:
        return None, "source does not compile (%s)" % e
    if fn.__name__ not in code.co_names:
        return None, "source does not define %s" % fn.__name__
    return src, None


def function_payload(fn):
    """The registration fields for fn: by source when possible, else pickled
    with cloudpickle or dill."""
    src, why = _source_of(fn)
    if src is not None:
        return {"kind": "source", "source": src, "function": fn.__name__}
    for name in ("cloudpickle", "dill"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        data = mod.dumps(fn)
        return {"kind": "pickle", "pickle": base64.b64encode(data).decode("ascii"), "pickler": name}
    raise KilnError(
        "cannot send %r by source (%s) and neither cloudpickle nor dill is installed: "
        "pip install cloudpickle (and add it to the image), or use a plain def" % (getattr(fn, "__name__", fn), why)
    )
