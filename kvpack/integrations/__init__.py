"""Bridges from kvpack to the systems that store KV caches; nothing here is imported by ``import kvpack``.

``chunks``: LMCache's chunks ``[2, layers, tokens, hidden]`` <-> ``.kvp`` streams (kvpack only).
``lmcache``: LMCache's serde ``"kvpack"``; it imports LMCache (the ``lmcache`` extra:
``pip install 'kvpack[lmcache]'``) and registers itself with LMCache when imported.
"""
