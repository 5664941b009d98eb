"""Put on PYTHONPATH for the drill's aggregator only: every path any fsspec filesystem opens or
reads in that user's processes (the worker and its flow runs) is appended to
$FEDLIB_AUDIT_OPENS, so the drill can show which data the aggregator touched. Filesystems are
wrapped as they are made (async ones define their own sync methods, so patching the base class
would miss them)."""

import os

_LOG = os.environ.get("FEDLIB_AUDIT_OPENS")
_READS = ("open", "_open", "cat_file", "_cat_file", "get_file", "_get_file")

if _LOG:
    import functools
    import inspect

    import fsspec.spec

    def _record(fs, path) -> None:
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        with open(_LOG, "a", encoding="utf-8") as handle:
            handle.write(f"{protocol}://{path}\n")

    def _audited(fs, method):
        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def wrapper(path, *args, **kwargs):
                _record(fs, path)
                return await method(path, *args, **kwargs)
        else:

            @functools.wraps(method)
            def wrapper(path, *args, **kwargs):
                _record(fs, path)
                return method(path, *args, **kwargs)

        return wrapper

    _make = fsspec.spec._Cached.__call__

    def _make_audited(cls, *args, **kwargs):
        fs = _make(cls, *args, **kwargs)
        if not fs.__dict__.get("_fedlib_audited"):
            for name in _READS:
                method = getattr(fs, name, None)
                if callable(method):
                    setattr(fs, name, _audited(fs, method))
            fs.__dict__["_fedlib_audited"] = True
        return fs

    fsspec.spec._Cached.__call__ = _make_audited
