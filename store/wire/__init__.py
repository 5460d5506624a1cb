"""The daemon's wire protocol, both ends: its constants (``constants``), every stream frame
as a typed message (``messages``), framing and message limits (``stream``), put framing
(``put_frame``), same-host regions (``shm``), cross-memory attach (``cma``), the same-host
handshake (``same_host``), UCX (``ucx_transport``) and the gRPC schema (``proto``).

It sits below the media: the ``remote`` backend speaks it through ``store.client``, and
the daemon's server (``store.daemon``) speaks it above the store it hosts.
"""
