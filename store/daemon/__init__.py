"""The ``kvstore serve`` daemon: one TieredStore shared by every engine on a node.

``service`` checks and runs requests; ``grpc_api`` (control API) and ``stream_server``
(bulk data, shared memory) are its transports; ``activity`` counts requests and drains
them on SIGTERM; ``serve`` wires it all together. docs/daemon.md describes it.
"""
