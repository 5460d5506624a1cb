"""kvstore backends: one module per storage medium behind ``backends.base.Backend``.

``cpu`` (paged host pool), ``gpu`` (paged device pool), ``disk`` (chunk files),
``gds`` (chunk files via kvikio/cuFile), ``redis`` (Redis/Valkey, standalone or cluster).
Modules are imported lazily through ``backends.base.create_backend``.
"""
