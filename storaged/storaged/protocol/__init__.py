"""The netblk wire protocol: constants mirrored from the UAPI header and a
sans-IO codec shared by storaged and the client library."""
