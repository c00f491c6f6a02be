"""Triton's CPU interpreter (TRITON_INTERPRET=1, the tests' tier) with a log-step scan, and
the language patched once per launch (:func:`use_one_patch_per_launch`) from lists of its
builtins made once (:func:`use_listed_builtins`): the last two change how often the
interpreter does its own set-up, not what a kernel computes.

The interpreter runs a ``tl.associative_scan`` with a combine function of one's own (the
attention forward's segmented sums and maxima) element by element: one interpreted call of
the combine function per element (ScanOps.generic_scan), which made the interpreter-tier tests
about twice as slow. :func:`use_log_step_scan` replaces that fallback with the inclusive scan a
GPU runs (Hillis-Steele): log2(n) steps, each one call of the same combine function on whole
arrays (element i combined with element i - offset). The combine function still runs, so a
wrong one still gives wrong answers; only associative ones are valid for tl.associative_scan
anyway, and for those the two orders agree (up to floating-point rounding). tl.cumsum and
tl.cumprod keep the interpreter's numpy paths.
"""

import os


def _interpreter():
    """triton.runtime.interpreter where TRITON_INTERPRET=1 and triton has it, else None."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        from triton.runtime import interpreter
    except ImportError:     # pragma: no cover - triton without the interpreter
        return None
    return interpreter


def use_log_step_scan() -> bool:
    """Installs the log-step scan in the interpreter (where TRITON_INTERPRET=1 and triton has the
    element-by-element fallback this replaces); returns whether it did."""
    interpreter = _interpreter()
    if interpreter is None:
        return False
    np = getattr(interpreter, "np", None)     # the interpreter's numpy (the library never imports numpy)
    if np is None:     # pragma: no cover - an interpreter laid out otherwise
        return False
    ops = getattr(interpreter, "ScanOps", None)
    if ops is None or not hasattr(ops, "generic_scan") or getattr(ops, "_rcar_log_step", False):
        return bool(ops is not None and getattr(ops, "_rcar_log_step", False))

    def log_step_scan(self, input):
        axis = self.axis
        out = [arg.handle.data.copy() for arg in input]
        n = out[0].shape[axis]
        shape = [1] * out[0].ndim
        shape[axis] = n
        offset = 1
        while offset < n:
            # every element i >= offset becomes combine(element i - offset, element i); the
            # combine runs on whole arrays (the interpreter takes power-of-two shapes only), the
            # first offset elements' results are dropped
            lo = [np.roll(o, offset, axis=axis) for o in out]
            res = self.combine_fn.fn(*(self.to_tensor(x, input[i].dtype) for i, x in enumerate(lo)),
                                     *(self.to_tensor(x, input[i].dtype) for i, x in enumerate(out)))
            res = res if isinstance(res, tuple) else (res,)
            keep = (np.arange(n) >= offset).reshape(shape)
            out = [np.where(keep, np.broadcast_to(r.handle.data if hasattr(r, "handle") else r, o.shape), o).astype(o.dtype)
                   for r, o in zip(res, out)]
            offset *= 2
        return [self.to_tensor(o, input[i].dtype) for i, o in enumerate(out)]

    ops.generic_scan = log_step_scan
    ops._rcar_log_step = True
    return True


def use_one_patch_per_launch() -> bool:
    """Makes a device-function call (a @triton.jit function called from a kernel) skip the
    interpreter's re-patching of triton.language when the running launch has already patched
    the language modules the function sees; returns whether it is installed (where
    TRITON_INTERPRET=1 and the interpreter is laid out as this expects).

    The interpreter patches triton.language (and tl.core, each where a function's globals name
    it) at the start of every launch, and again at every device-function call, each time walking
    the modules' members with inspect.getmembers: about 15% of the interpreter tier's time
    (py-spy). Inside a launch the second patch sets what the first has set, so it is skipped;
    a function whose globals name a language module the launch has not patched yet (tl.core,
    which triton's own tl.sum and tl.max name, where the kernel's module names only tl) is still
    patched, once per launch (the interpreter never undoes a device call's patch), as is any call
    outside a launch."""
    it = _interpreter()
    if it is None:
        return False
    grid_cls, fn_cls = getattr(it, "GridExecutor", None), getattr(it, "InterpretedFunction", None)
    patch, error = getattr(it, "_patch_lang", None), getattr(it, "InterpreterError", None)
    if None in (grid_cls, fn_cls, patch, error) or not hasattr(fn_cls, "rewrite"):   # pragma: no cover
        return False
    if getattr(fn_cls, "_rcar_one_patch", False):
        return True
    import inspect
    lang = (it.tl, it.tl.core)
    active = []      # the language modules each running launch has patched so far (a stack)
    seen = {}        # id(globals) -> (the globals, the language modules they name)

    def langs(fn):
        g = fn.__globals__
        entry = seen.get(id(g))
        if entry is None or entry[0] is not g:
            entry = seen[id(g)] = (g, frozenset(id(v) for v in list(g.values()) if inspect.ismodule(v) and v in lang))
        return entry[1]

    launch = grid_cls.__call__

    def launch_tracked(self, *args, **kwargs):
        active.append(set(langs(self.fn)))
        try:
            return launch(self, *args, **kwargs)
        finally:
            active.pop()

    def device_call(self, *args, **kwargs):   # InterpretedFunction.__call__ less the patch it repeats
        need = langs(self.fn)
        if not (active and need <= active[-1]):
            patch(self.fn)      # as the interpreter does; never undone, so it holds to the launch's end
            if active:
                active[-1].update(need)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise error(repr(e)) from e

    grid_cls.__call__ = launch_tracked
    fn_cls.__call__ = device_call
    fn_cls._rcar_one_patch = True
    return True


def use_listed_builtins() -> bool:
    """Makes the interpreter's per-launch patch of triton.language walk a list of each module's
    builtins made once, instead of inspect.getmembers of the module at every launch (sorted
    over every attribute, then filtered: about a tenth of the interpreter tier's time by
    py-spy); returns whether it is installed. The list is taken the first time a module is
    patched, before any patch (the interpreter restores the originals after each launch), and
    holds the original builtins, which is what each patch wraps."""
    it = _interpreter()
    if it is None:
        return False
    patch_attr, is_builtin = getattr(it, "_patch_attr", None), getattr(it.tl.core, "is_builtin", None)
    if patch_attr is None or is_builtin is None or not hasattr(it, "_patch_builtin"):   # pragma: no cover
        return False
    if getattr(it._patch_builtin, "_rcar_listed", False):
        return True
    import inspect
    listed = {}      # id(module or class) -> (the module or class, [(name, its original builtin)])

    def patch_builtin(pkg, builder, scope):
        entry = listed.get(id(pkg))
        if entry is None or entry[0] is not pkg:
            entry = listed[id(pkg)] = (pkg, [(n, m) for n, m in inspect.getmembers(pkg) if is_builtin(m)])
        for name, member in entry[1]:
            patch_attr(pkg, name, member, builder, scope)

    patch_builtin._rcar_listed = True
    it._patch_builtin = patch_builtin
    return True
