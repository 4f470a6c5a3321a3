"""`kedro ARGS` in this very process, with kill -9 sites: the driver of
tests/test_fault_injection.py (issue 12).

    python tests/fault_injection_runner.py [--log PATH] [--hook MODULE:QUALNAME]...
        [--kill JSON] -- run --env smoke --pipelines=train

Sites are generic, so that they outlive refactorings of the modules they stop:

* every `os.replace` and `os.rename`: each atomic commit of the project goes through one
  (`atomic.py`, the shard and feature writers, a checkpoint folder taking its name,
  `latest.json` taking charge), so "just before" and "just after" one is a kill between the
  two sides of a commit. Its event is `["replace", the destination's absolute path]`;
* the functions named by `--hook MODULE:QUALNAME` (a module attribute, or a class attribute
  such as `keras.callbacks:CallbackList.on_train_batch_end`, which Keras' `fit` calls after
  every batch), replaced by a wrapper for the run. Its event is `["MODULE:QUALNAME", digest]`,
  the digest a sha256 of the call's plain-data arguments (bytes, strings, numbers, numpy
  arrays, and lists, tuples and dicts of them; a class attribute's `self` and other objects
  count by their type only), so that a run that repeats a call with the same data (a
  re-written record, a re-taken SCST step) repeats its event.

`--log PATH`: the events, in order, as JSON `{"events": [[kind, detail], ...], "killed": ...}`,
written when Kedro returns and, before the kill, by a killed run: the test reads from it how
many times a site was reached, and where. `--kill JSON`: `{"when": "before" | "after",
"event": "replace" | "MODULE:QUALNAME" | "*" (any), "match": a glob of the detail (default
"*"), "n": N}`: at the N-th matching event, `os.kill(os.getpid(), SIGKILL)`, a real kill -9
at a real instruction (no exception unwinds, no `finally` runs, no buffer is flushed). An
"after" kill of a call that logs events of its own (a callback that saves a checkpoint) dies
after those too.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import importlib
import json
import os
import signal
import sys
import threading

REPLACE = "replace"
ANY = "*"  # a kill's event: any event


class Sites:
    """The event log and the one kill, shared by every wrapper (a lock: a library may
    rename from a thread of its own)."""

    def __init__(self, log: str | None, kill: dict | None):
        self.log, self.kill = log, kill
        self.events: list[list[str]] = []
        self.hits = 0  # matching events of the kill, so far
        self.lock = threading.Lock()

    def matches(self, kind: str, detail: str) -> bool:
        kill = self.kill
        return (
            kill is not None
            and kill["event"] in (ANY, kind)
            and fnmatch.fnmatchcase(detail, kill.get("match", "*"))
        )

    def before(self, kind: str, detail: str) -> bool:
        """Log the event; kill now if it is the kill's N-th before; True if it is the N-th
        after (the caller kills once the call returns)."""
        with self.lock:
            self.events.append([kind, detail])
            if not self.matches(kind, detail):
                return False
            self.hits += 1
            nth = self.hits == self.kill["n"]
        if nth and self.kill["when"] == "before":
            self.die(kind, detail)
        return nth

    def die(self, kind: str, detail: str) -> None:
        self.write(
            {
                "when": self.kill["when"],
                "event": kind,
                "detail": detail,
                "n": self.kill["n"],
                "events": len(self.events),
            }
        )
        print(
            f"fault_injection: kill -9 {self.kill['when']} {kind} {detail} (hit {self.kill['n']})",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGKILL)

    def write(self, killed: dict | None) -> None:
        if not self.log:
            return
        with self.lock:
            data = json.dumps({"events": self.events, "killed": killed})
        # Plain writes: an os.replace here would be an event of its own.
        with open(self.log, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def wrap_replace(sites: Sites, real):
    @functools.wraps(real)
    def replace(src, dst, *args, **kwargs):
        path = os.path.abspath(os.fsdecode(dst)) if not isinstance(dst, int) else str(dst)
        after = sites.before(REPLACE, path)
        result = real(src, dst, *args, **kwargs)
        if after:
            sites.die(REPLACE, path)
        return result

    return replace


def digest(value, h) -> None:
    """Feed `value`'s plain data to the hash `h` (see the module docstring)."""
    numpy = sys.modules.get("numpy")
    if isinstance(value, bytes | bytearray | memoryview):
        h.update(b"b%d:" % len(value) + bytes(value))
    elif isinstance(value, str):
        h.update(b"s" + value.encode() + b"\0")
    elif value is None or isinstance(value, bool | int | float):
        h.update(b"n" + repr(value).encode() + b"\0")
    elif numpy is not None and isinstance(value, numpy.ndarray):
        h.update(f"a{value.dtype.str}{value.shape}".encode())
        h.update(numpy.ascontiguousarray(value).tobytes())
    elif isinstance(value, list | tuple):
        h.update(b"l%d:" % len(value))
        for item in value:
            digest(item, h)
    elif isinstance(value, dict):
        h.update(b"d%d:" % len(value))
        for key in sorted(value, key=str):
            digest(str(key), h)
            digest(value[key], h)
    else:
        h.update(b"o" + type(value).__qualname__.encode() + b"\0")


def wrap_call(sites: Sites, name: str, real, method: bool):
    @functools.wraps(real)
    def call(*args, **kwargs):
        h = hashlib.sha256()
        digest([args[1:] if method else args, kwargs], h)
        detail = h.hexdigest()[:16]
        after = sites.before(name, detail)
        result = real(*args, **kwargs)
        if after:
            sites.die(name, detail)
        return result

    return call


def install(sites: Sites, hooks: list[str]) -> None:
    os.replace = wrap_replace(sites, os.replace)
    os.rename = wrap_replace(sites, os.rename)
    for name in hooks:
        module_name, _, qualname = name.partition(":")
        owner = importlib.import_module(module_name)
        *path, attribute = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        method = isinstance(owner, type)
        setattr(owner, attribute, wrap_call(sites, name, getattr(owner, attribute), method))


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(__doc__)
    options, kedro_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    log, kill, hooks = None, None, []
    pairs = iter(options)
    for option in pairs:
        value = next(pairs)
        if option == "--log":
            log = value
        elif option == "--hook":
            hooks.append(value)
        elif option == "--kill":
            kill = json.loads(value)
        else:
            raise SystemExit(f"unknown option {option}\n{__doc__}")
    if kill and kill["event"] not in (REPLACE, ANY, *hooks):
        hooks.append(kill["event"])
    sites = Sites(log, kill)
    install(sites, hooks)

    from kedro.framework.cli import main as kedro

    sys.argv = ["kedro", *kedro_args]
    try:
        kedro()
    finally:
        sites.write(None)


if __name__ == "__main__":
    main(sys.argv[1:])
