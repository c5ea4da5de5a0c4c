"""tls-bridge: the TLS 1.3 + login helper behind netblk.ko's handshake upcall.

The driver hands a connected TCP socket over generic netlink; tls-bridge runs
the mutual-TLS handshake on it, installs the traffic keys as kernel TLS, logs
in with the export's token and hands the socket back (docs/architecture.md).
"""
