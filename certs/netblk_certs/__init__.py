"""Certificate and token tooling for netblk (the ``netblk-certs`` command).

storaged, tls-bridge and the admin API import ``netblk_certs.tokens`` to check
login and bearer tokens; ``netblk_certs.pki`` creates the mutual-TLS files.
"""
