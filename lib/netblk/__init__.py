"""netblk: what every netblk daemon shares.

The wire protocol (``netblk.protocol``: constants mirrored from the UAPI
header, the sans-IO codec, name rules), the kernel-TLS key schedule
(``netblk.ktls``), TLS and TOML config readers (``netblk.tlsconf``,
``netblk.tomlconf``), logging (``netblk.logs``), login and bearer tokens
(``netblk.tokens``) and the daemons' common command line (``netblk.daemon``).
storaged, tls-bridge, the admin API and netblk-certs import it; it imports
none of them.
"""
