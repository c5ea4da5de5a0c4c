"""storaged: the netblk storage server, its protocol and a client library."""

__version__ = "0.1.0"
