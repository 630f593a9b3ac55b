"""Bridges from kvpack to the systems that store KV caches (LMCache); nothing here is imported by ``import kvpack``.

Each module imports its system when it is imported itself, and says which extra installs it:
``kvpack.integrations.lmcache`` (``pip install 'kvpack[lmcache]'``) registers kvpack as LMCache's
serde ``"kvpack"``.
"""
