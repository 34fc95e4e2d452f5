def kiln_run(argv, env, max_output):
    """Run argv in the guest and return its status and output (base64).

    python3 -c CODE / -m MOD / SCRIPT run in a fork of the agent, which has
    the image's preload modules imported already; anything else runs as a
    child process."""
    import base64
    import os
    import selectors
    import subprocess
    import sys

    def python_form(argv):
        exe = os.path.basename(argv[0])
        if exe not in ("python", "python3") and not exe.startswith("python3."):
            return None
        rest = argv[1:]
        if len(rest) >= 2 and rest[0] in ("-c", "-m"):
            return rest[0], rest[1], rest[2:]
        if rest and not rest[0].startswith("-"):
            return "file", rest[0], rest[1:]
        return None

    def child(form):
        kind, target, rest = form
        os.environ.update(env)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        import runpy
        code = 0
        try:
            if kind == "-c":
                sys.argv = ["-c"] + list(rest)
                sys.path.insert(0, "")
                exec(compile(target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
            elif kind == "-m":
                sys.argv = [target] + list(rest)
                sys.path.insert(0, os.getcwd())
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                sys.argv = [target] + list(rest)
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                runpy.run_path(target, run_name="__main__")
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)

    form = python_form(argv)
    rout, wout = os.pipe()
    rerr, werr = os.pipe()
    proc = None
    pid = 0
    if form is not None:
        pid = os.fork()
        if pid == 0:
            try:
                null = os.open("/dev/null", os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(wout, 1)
                os.dup2(werr, 2)
                for fd in (null, rout, rerr, wout, werr):
                    os.close(fd)
                child(form)
            finally:
                os._exit(127)
    else:
        penv = dict(os.environ)
        penv.update(env)
        try:
            proc = subprocess.Popen(argv, env=penv, stdin=subprocess.DEVNULL, stdout=wout, stderr=werr)
        except OSError as e:
            os.close(rout), os.close(wout), os.close(rerr), os.close(werr)
            msg = "kiln: %s: %s\n" % (argv[0], e.strerror)
            return {"code": 127, "stdout": "", "stderr": base64.b64encode(msg.encode()).decode(),
                    "stdout_truncated": False, "stderr_truncated": False}
    os.close(wout)
    os.close(werr)
    bufs = {rout: bytearray(), rerr: bytearray()}
    trunc = {rout: False, rerr: False}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    open_fds = 2
    while open_fds:
        for key, _ in sel.select():
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fd)
                os.close(key.fd)
                open_fds -= 1
                continue
            room = max_output - len(bufs[key.fd])
            if len(data) > room:
                trunc[key.fd] = True
            bufs[key.fd] += data[:max(room, 0)]
    sel.close()
    if proc is not None:
        code = proc.wait()
        if code < 0:
            code = 128 - code
    else:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            code = 128 - code
    return {"code": code,
            "stdout": base64.b64encode(bytes(bufs[rout])).decode(),
            "stderr": base64.b64encode(bytes(bufs[rerr])).decode(),
            "stdout_truncated": trunc[rout], "stderr_truncated": trunc[rerr]}
