"""Capture of a function for a kiln VM: its source, and what it uses from its module.

A plain function is sent by source together with the module-level names it
uses, found from its code objects (recursively through nested code and the
helpers it pulls in):

- modules are imported again in the guest by name;
- functions and classes of the client's own modules (``__main__``, or a
  module the image lacks) are sent by source, recursively, each into a
  module of the same name in the guest, so that pickle finds them there;
- functions and classes of modules the image has go by reference;
- other values go by value (JSON, else pickle), up to a size cap.

A name that cannot be sent is a CaptureError at submit time that names the
global and says why, never a NameError in the guest. Sources keep their file
name and line numbers, so remote tracebacks point at the user's file.
"""

import base64
import builtins
import dis
import functools
import inspect
import io
import json
import math
import os
import pickle
import sys
import sysconfig
import textwrap
import types

from ._errors import KilnError

# Caps on what a capture may hold: one value, and all of them together.
MAX_VALUE = 1 << 20
MAX_TOTAL = 16 << 20

# Standard library modules kiln images leave out (see docs/spec.md, keep).
_PRUNED = {"test", "idlelib", "tkinter", "ensurepip", "lib2to3", "pydoc_data", "turtledemo"}


class CaptureError(KilnError, TypeError):
    """A function, or something it uses, cannot be sent to a kiln VM."""


def _stdlib_names():
    names = set(getattr(sys, "stdlib_module_names", ()))
    names |= set(sys.builtin_module_names)
    return names - _PRUNED


_STDLIB = _stdlib_names()
_SITE_DIRS = tuple(
    os.path.realpath(p)
    for p in {sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")}
    | set(getattr(sys, "path", []))
    if p and ("site-packages" in p or "dist-packages" in p)
)


class ImageModules:
    """Which modules a kiln image can import: its standard library and the
    top-level modules of its packages (as the endpoint reports them; None
    when unknown, then modules installed in the client's site-packages are
    assumed to be in the image too)."""

    def __init__(self, modules=None):
        self.modules = set(modules) if modules is not None else None

    def has(self, modname):
        if not modname:
            return False
        top = modname.split(".")[0]
        if top in ("__main__", "__mp_main__"):
            return False
        if top in _STDLIB:
            return True
        if self.modules is not None:
            return top in self.modules
        mod = sys.modules.get(top)
        f = getattr(mod, "__file__", None)
        return bool(f) and os.path.realpath(f).startswith(_SITE_DIRS)


def _global_names(code):
    """The global names code loads (recursively through nested code), and
    the attribute names it uses (for submodules)."""
    names, attrs = set(), set()
    todo = [code]
    while todo:
        c = todo.pop()
        for ins in dis.get_instructions(c):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"):
                names.add(ins.argval)
            elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM"):
                attrs.add(ins.argval)
        todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return names, attrs


def _jsonable(v, depth=0):
    """Whether JSON gives v back exactly, with the same types (a tuple would
    come back a list, so it is not)."""
    if depth > 100:
        return False
    t = type(v)
    if v is None or t is bool or t is int or t is str:
        return True
    if t is float:
        return math.isfinite(v)
    if t is list:
        return all(_jsonable(x, depth + 1) for x in v)
    if t is dict:
        return all(type(k) is str and _jsonable(x, depth + 1) for k, x in v.items())
    return False


class _Pickler(pickle.Pickler):
    """Records the classes and functions of the client's own modules that a
    pickle refers to: they must be defined in the guest before it loads."""

    def __init__(self, f, local):
        super().__init__(f, protocol=4)
        self.local = local
        self.found = []

    def reducer_override(self, obj):
        if isinstance(obj, type) or isinstance(obj, types.FunctionType):
            if self.local(getattr(obj, "__module__", None)):
                self.found.append(obj)
        else:
            t = type(obj)
            if self.local(getattr(t, "__module__", None)):
                self.found.append(t)
        return NotImplemented


def dumps(v, local):
    """Pickles v and returns (bytes, the client-local classes and functions
    it refers to)."""
    buf = io.BytesIO()
    p = _Pickler(buf, local)
    p.dump(v)
    return buf.getvalue(), p.found


def _source(obj):
    """(source, filename, first line) of a module-level function or class."""
    target = inspect.unwrap(obj) if callable(obj) and not isinstance(obj, type) else obj
    lines, lineno = inspect.getsourcelines(target)
    filename = inspect.getsourcefile(target) or inspect.getfile(target)
    src = "".join(lines)
    if src[:1].isspace():
        src = textwrap.dedent(src)
    return src, os.path.abspath(filename) if not filename.startswith("<") else filename, max(lineno, 1)


def _namedtuple_source(cls):
    """Source that makes the collections.namedtuple class cls again."""
    defaults = getattr(cls, "_field_defaults", {}) or {}
    dflt = tuple(defaults[f] for f in cls._fields if f in defaults)
    return "%s = __import__('collections').namedtuple(%r, %r, defaults=%r, module=__name__)\n" % (
        cls.__name__, cls.__name__, tuple(cls._fields), dflt or None)


def _ref(obj):
    """"module:qualname" of an importable object, or None."""
    mod = getattr(obj, "__module__", None)
    qn = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not mod or not qn or "<" in qn:
        return None
    return "%s:%s" % (mod, qn)


class Capture:
    """Builds the namespace of one registration: the entries (task.Def in
    Go) the agent defines, in order, before the function's own source."""

    def __init__(self, image):
        self.image = image
        self.entries = []
        self.seen = {}  # (module, name) -> True once defined or being defined
        self.total = 0

    def local(self, modname):
        return bool(modname) and not self.image.has(modname)

    # -- what the function needs --------------------------------------------

    def need_code(self, code, module, gl, who):
        names, attrs = _global_names(code)
        for name in sorted(names):
            self.need(name, module, gl, attrs, who)

    def need(self, name, module, gl, attrs, who):
        key = (module, name)
        if key in self.seen or name not in gl:
            return  # defined already, or a builtin (or undefined: NameError as locally)
        self.seen[key] = True
        v = gl[name]
        entry = self.entry(name, v, module, attrs, who)
        if entry is not None:
            self.entries.append(entry)

    def entry(self, name, v, module, attrs, who):
        e = {"name": name}
        if module != self.main_module:
            e["module"] = module
        if isinstance(v, types.ModuleType):
            if self.local(v.__name__):
                raise CaptureError(
                    "%s uses the module %s (global %r), which the image lacks: add it to the image, or import what the function needs inside it"
                    % (who, v.__name__, name)
                )
            e["import"] = v.__name__
            prefix = v.__name__ + "."
            subs = sorted(m for m in list(sys.modules) if m.startswith(prefix) and m[len(prefix):].split(".")[0] in attrs)
            if subs:
                e["submodules"] = subs
            return e
        if isinstance(v, (type, types.FunctionType, functools.partial)) or (callable(v) and hasattr(v, "__wrapped__")):
            mod = getattr(v, "__module__", None)
            if isinstance(v, functools.partial) or not self.local(mod):
                ref = _ref(v) if not isinstance(v, functools.partial) else None
                if ref is not None:
                    e["ref"] = ref
                    return e
            else:
                self.define(v, "%s's global %r" % (who, name))
                if mod == module:
                    return None  # defined under its own name in this module
                e["ref"] = _ref(v)
                return e
        if inspect.isbuiltin(v) and _ref(v) and not self.local(getattr(v, "__module__", None)):
            e["ref"] = _ref(v)
            return e
        e["value"] = self.value(v, "%s's global %r" % (who, name), module)
        return e

    def define(self, obj, who):
        """Adds the source of a client-local function or class, after what
        it needs, into its own module."""
        module = obj.__module__
        name = obj.__name__
        key = (module, name)
        if self.seen.get(("src",) + key):
            return
        self.seen[("src",) + key] = True
        self.seen[key] = True
        qn = getattr(obj, "__qualname__", name)
        if "<" in qn or qn != name:
            raise CaptureError("%s: %s is not defined at the top level of its module (%s), so it cannot be sent by source; move it to module level" % (who, qn, module))
        if isinstance(obj, types.FunctionType) and obj.__closure__:
            raise CaptureError("%s: %s is a closure and cannot be sent by source" % (who, name))
        try:
            src, filename, lineno = _source(obj)
        except (OSError, TypeError) as e:
            if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
                src, filename, lineno = _namedtuple_source(obj), "<kiln namedtuple %s>" % name, 1
            else:
                raise CaptureError("%s: no source for %s (%s)" % (who, name, e)) from None
        gl = vars(sys.modules[module]) if module in sys.modules else getattr(obj, "__globals__", {})
        try:
            code = compile(src, filename, "exec")
        except SyntaxError as e:
            raise CaptureError("%s: the source of %s does not compile alone (%s)" % (who, name, e)) from None
        self.need_code(code, module, gl, name)
        e = {"name": name, "source": src, "filename": filename, "lineno": lineno}
        if module != self.main_module:
            e["module"] = module
        self.entries.append(e)

    def value(self, v, who, module):
        if _jsonable(v):
            data = json.dumps(v)
            self.charge(len(data), who)
            return {"enc": "json", "data": v}
        try:
            raw, found = dumps(v, self.local)
        except Exception as e:  # noqa: BLE001 - any pickling failure names the global
            raise CaptureError("%s cannot be sent: it is a %s, which is not JSON and cannot be pickled (%s)" % (who, type(v).__name__, e)) from None
        self.charge(len(raw) * 4 // 3, who)
        for obj in found:
            self.define(obj, who)
        return {"enc": "pickle", "data": base64.b64encode(raw).decode("ascii")}

    def charge(self, n, who):
        if n > MAX_VALUE:
            raise CaptureError("%s is %d bytes encoded, over the cap of %d: pass it as an argument, or read it in the function" % (who, n, MAX_VALUE))
        self.total += n
        if self.total > MAX_TOTAL:
            raise CaptureError("the names the function uses are over %d bytes in all (at %s): pass large values as arguments" % (MAX_TOTAL, who))

    # -- the registration ------------------------------------------------------

    def function(self, fn):
        """The registration fields that send fn by source, or None when fn
        goes by reference."""
        self.main_module = getattr(fn, "__module__", None) or "__main__"
        if not self.local(self.main_module):
            return None
        return self._main(fn)

    def _main(self, fn):
        name = fn.__name__
        qn = getattr(fn, "__qualname__", name)
        if isinstance(fn, types.FunctionType) and (fn.__closure__ or fn.__name__ == "<lambda>"):
            raise CaptureError("%s is a %s" % (qn, "lambda" if fn.__name__ == "<lambda>" else "closure"))
        try:
            src, filename, lineno = _source(fn)
        except (OSError, TypeError) as e:
            raise CaptureError("no source for %s (%s)" % (qn, e)) from None
        try:
            code = compile(src, filename, "exec")
        except SyntaxError as e:
            raise CaptureError("the source of %s does not compile alone (%s)" % (qn, e)) from None
        module = self.main_module
        gl = vars(sys.modules[module]) if module in sys.modules else getattr(fn, "__globals__", {})
        self.seen[(module, name)] = True
        self.seen[("src", module, name)] = True
        self.need_code(code, module, gl, qn)
        return {"kind": "source", "source": src, "function": name, "module": module, "filename": filename, "lineno": lineno}


def capture(fn, image):
    """The registration fields for fn (a plain function, a builtin, a
    function or class of a module, or a class's method given as
    Class.method). Returns (fields, reason) where fields is None when fn
    cannot be sent by source or reference (reason says why)."""
    c = Capture(image)
    mod = getattr(fn, "__module__", None)
    if isinstance(fn, types.FunctionType) or isinstance(fn, type) or hasattr(fn, "__wrapped__"):
        if not c.local(mod):
            ref = _ref(fn)
            if ref:
                return {"kind": "ref", "ref": ref}, None
        try:
            fields = c.function(fn) if isinstance(fn, types.FunctionType) else None
        except CaptureError as e:
            return None, e
        if fields is not None:
            if c.entries:
                fields["namespace"] = c.entries
            return fields, None
        return None, CaptureError("%r cannot be sent by source" % (fn,))
    if inspect.isbuiltin(fn) or isinstance(fn, types.BuiltinFunctionType):
        ref = _ref(fn)
        if ref and not c.local(getattr(fn, "__module__", None) or "builtins"):
            return {"kind": "ref", "ref": ref}, None
    # Other callables (numpy ufuncs, …) that pickle by reference to modules
    # the image has go as a plain pickle.
    try:
        raw, found = dumps(fn, c.local)
    except Exception as e:  # noqa: BLE001 - not picklable
        return None, CaptureError("%r is not a function, class or builtin, and cannot be pickled (%s)" % (fn, e))
    if found:
        return None, CaptureError("%r refers to the client's own %s, which the image lacks" % (fn, found[0]))
    return {"kind": "pickle", "pickle": base64.b64encode(raw).decode("ascii"), "pickler": "pickle"}, None


def method(cls, fname, image):
    """Registration fields that call cls.fname, cls defined by source when
    it is the client's own (a bound method, called with its instance)."""
    c = Capture(image)
    c.main_module = cls.__module__
    if not c.local(cls.__module__):
        ref = _ref(cls)
        if ref:
            return {"kind": "ref", "ref": ref + "." + fname}
    c.define(cls, "the method %s.%s" % (cls.__qualname__, fname))
    main = c.entries.pop()
    fields = {"kind": "source", "source": main["source"], "function": cls.__name__ + "." + fname,
              "module": cls.__module__, "filename": main["filename"], "lineno": main["lineno"]}
    if c.entries:
        fields["namespace"] = c.entries
    return fields


def add_classes(fields, objs, image):
    """Adds to fields' namespace the sources of client-local classes and
    functions that arguments refer to (found by dumps), so the guest can
    load them."""
    if not objs:
        return fields
    c = Capture(image)
    c.main_module = fields.get("module") or "__main__"
    for e in fields.get("namespace", []):
        c.seen[(e.get("module", c.main_module), e["name"])] = True
        if "source" in e:
            c.seen[("src", e.get("module", c.main_module), e["name"])] = True
    if fields.get("kind") == "source":
        top = fields["function"].split(".")[0]
        c.seen[(c.main_module, top)] = True
        c.seen[("src", c.main_module, top)] = True
    for obj in objs:
        c.define(obj, "an argument's %s" % ("class" if isinstance(obj, type) else "function"))
    if c.entries:
        fields = dict(fields)
        fields["namespace"] = list(fields.get("namespace", [])) + c.entries
    return fields


def builtin_names():
    return set(dir(builtins))
