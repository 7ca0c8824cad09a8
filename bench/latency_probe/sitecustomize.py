"""
A latency probe for tproxy-twist workers (bench/latency.py puts this
directory first on PYTHONPATH, and sets C{TPROXY_TWIST_LATENCY_PROBE} to a
directory; without that variable this module does nothing).

In a worker (C{python -m tproxy_twist.worker}) it records, on
C{time.monotonic()} (CLOCK_MONOTONIC: the same clock as the client's, in
every namespace):

- every cyclic garbage collection: start, end, generation, objects collected;
- every reactor iteration: when C{epoll_wait} returned, how long handling its
  events took (and how much of that was CPU time of the thread), how many
  there were, the timeout it was given;
- every delayed-call pass (C{runUntilCurrent}) and every C{LoopingCall} run
  (the relay's 4x/s sweep and metrics flush, the heartbeat): start and end.

Samples go into C{array}s of floats (not tracked by the garbage collector,
so the probe adds no collections of its own) and are written as JSON to
C{<dir>/worker-<pid>.json} when the worker exits.  A test build, for
C{bench/latency.py} only: nothing in the proxy imports it.
"""

import os
import sys

_DIR = os.environ.get("TPROXY_TWIST_LATENCY_PROBE")


def _install(directory: str) -> None:
    import atexit
    import gc
    import json
    import time
    from array import array

    now = time.monotonic
    cpu = time.thread_time
    gcs = array("d")  # start, end, generation, collected
    polls = array("d")  # returned, handled, events, timeout, CPU seconds spent handling
    timed = array("d")  # start, end of runUntilCurrent
    loops = array("d")  # start, end, code of a LoopingCall's function
    names: dict[str, int] = {}
    started = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            started[0] = now()
        else:
            gcs.extend((started[0], now(), info["generation"], info["collected"]))

    gc.callbacks.append(on_gc)

    def patch_reactor(module) -> None:
        cls = module.WorkerReactor
        run_until_current = cls.runUntilCurrent
        do_poll = cls.doPoll

        class TimedPoller:
            """The reactor's epoll object, noting when and with how many events poll returned."""

            def __init__(self, poller):
                self._poller = poller
                self.returned = None

            def poll(self, timeout, maxevents):
                events = self._poller.poll(timeout, maxevents)
                self.returned = now()
                self.cpu0 = cpu()
                self.count = len(events)
                return events

            def __getattr__(self, name):  # register, modify, unregister, close, fileno
                return getattr(self._poller, name)

        # WorkerReactor.doPoll itself, with clock readings around its events.
        def doPoll(self, timeout):
            poller = self._poller
            if not isinstance(poller, TimedPoller):
                poller = self._poller = TimedPoller(poller)
            poller.returned = None
            do_poll(self, timeout)
            if poller.returned is not None:  # (not after an EINTR)
                asked = -1.0 if timeout is None else timeout
                polls.extend((poller.returned, now(), poller.count, asked, cpu() - poller.cpu0))

        def runUntilCurrent(self):
            t0 = now()
            run_until_current(self)
            timed.extend((t0, now()))

        cls.doPoll = cls.doIteration = doPoll
        cls.runUntilCurrent = runUntilCurrent

        from twisted.internet import task

        call = task.LoopingCall.__call__

        def __call__(self):
            f = self.f
            name = getattr(f, "__qualname__", None) or repr(f)
            code = names.setdefault(name, len(names))
            t0 = now()
            try:
                return call(self)
            finally:
                loops.extend((t0, now(), code))

        task.LoopingCall.__call__ = __call__

    class _Finder:
        """Patch tproxy_twist.reactor as soon as it is imported."""

        def find_spec(self, name, path=None, target=None):
            if name != "tproxy_twist.reactor":
                return None
            sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(name)
            loader = spec.loader
            exec_module = loader.exec_module

            def run(module):
                exec_module(module)
                patch_reactor(module)

            loader.exec_module = run
            return spec

    sys.meta_path.insert(0, _Finder())

    def dump() -> None:
        if "tproxy_twist.worker" not in " ".join(sys.argv) and not sys.argv[0].endswith(
            "worker.py"
        ):
            return
        out = {
            "pid": os.getpid(),
            "gc_threshold": gc.get_threshold(),
            "gc_count": gc.get_count(),
            "gc_objects": len(gc.get_objects()),
            "gc_frozen": gc.get_freeze_count(),
            "gc": gcs.tolist(),
            "polls": polls.tolist(),
            "timed": timed.tolist(),
            "loops": loops.tolist(),
            "loop_names": {v: k for k, v in names.items()},
        }
        with open(os.path.join(directory, f"worker-{os.getpid()}.json"), "w") as f:
            json.dump(out, f)

    atexit.register(dump)


if _DIR:
    _install(_DIR)
