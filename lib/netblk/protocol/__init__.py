"""The netblk wire protocol: constants mirrored from the UAPI header, a
sans-IO codec shared by storaged, tls-bridge and the client library, and
the export and client name rule."""
