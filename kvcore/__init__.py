"""The bottom layer: the KV vocabulary every other package speaks.

The one key (``keys``), the chunk object (``chunk``), KV events (``events``), the host
buffers they live in (``buffers``, ``shared_memory``), and the few process and HTTP
helpers every front end shares (``heap``, ``bearer``, ``json_text``). Nothing here imports
any other package of this project (tests/test_layering.py).
"""
