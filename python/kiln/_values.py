"""Encoding of functions, arguments and results (the agent's task.Value format)."""

import base64
import functools
import inspect
import pickle
import types

from . import _capture
from ._capture import CaptureError, ImageModules
from ._errors import KilnError


def encode_value(v):
    """Encode v as {"enc": "json", "data": v} when JSON gives it back with
    the same types, else as a base64 pickle (a tuple, a set, an object)."""
    return encode(v)[0]


def encode(v, image=None):
    """encode_value, and the client's own classes and functions the pickle
    refers to (they travel with the function, by source)."""
    if _capture._jsonable(v):
        return {"enc": "json", "data": v}, []
    image = image or ImageModules()
    try:
        raw, found = _capture.dumps(v, lambda m: bool(m) and not image.has(m))
    except Exception as e:  # noqa: BLE001 - any pickling failure
        raise KilnError("cannot send a %s: it is not JSON and cannot be pickled: %s" % (type(v).__name__, e)) from e
    return {"enc": "pickle", "data": base64.b64encode(raw).decode("ascii")}, found


def decode_value(d):
    """Decode a task.Value dict (pickles only from the client's own tasks:
    see docs/api.md, trust)."""
    if d is None:
        return None
    enc = d.get("enc")
    if enc == "json":
        return d.get("data")
    if enc == "pickle":
        return pickle.loads(base64.b64decode(d["data"]))
    raise KilnError("unknown value encoding %r" % (enc,))


def unwrap_call(fn, args, kwargs):
    """Turns a partial or a bound method into the callable the registration
    names and the call's arguments: (target, args, kwargs) where target is a
    function or builtin, or ("method", cls, name) for a bound method."""
    while isinstance(fn, functools.partial):
        args = tuple(fn.args) + tuple(args)
        kwargs = {**fn.keywords, **kwargs}
        fn = fn.func
    if inspect.ismethod(fn) and not isinstance(fn.__self__, type):
        return ("method", type(fn.__self__), fn.__func__.__name__), (fn.__self__,) + tuple(args), kwargs
    return fn, tuple(args), kwargs


def function_payload(fn, image=None):
    """The registration fields for fn: by reference when the image can
    import it, else by source with what it uses from its module, else
    pickled with cloudpickle or dill (lambdas, closures)."""
    image = image or ImageModules()
    if isinstance(fn, tuple) and fn[0] == "method":
        try:
            return _capture.method(fn[1], fn[2], image)
        except CaptureError as e:
            return _pickled(getattr(fn[1], fn[2]), e)
    fields, why = _capture.capture(fn, image)
    if fields is not None:
        return fields
    return _pickled(fn, why)


def _pickled(fn, why):
    for name in ("cloudpickle", "dill"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        data = mod.dumps(fn)
        return {"kind": "pickle", "pickle": base64.b64encode(data).decode("ascii"), "pickler": name}
    raise CaptureError(
        "cannot send %s: %s; neither cloudpickle nor dill is installed (pip install cloudpickle, and add it to the image), "
        "or use a plain module-level def" % (getattr(fn, "__qualname__", fn), why)
    )


def is_function(fn):
    return isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, functools.partial, type)) or callable(fn)


def add_classes_for(fields, classes, image):
    """fields with the sources of the client's own classes (and functions)
    that a call's arguments refer to added to its namespace."""
    if not classes or fields.get("kind") != "source":
        return fields
    return _capture.add_classes(fields, classes, image)
