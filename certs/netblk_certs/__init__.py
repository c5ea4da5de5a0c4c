"""Certificate tooling for netblk (the ``netblk-certs`` command).

``netblk_certs.pki`` creates the mutual-TLS files; tokens and their hashes
come from the shared ``netblk.tokens``.
"""
