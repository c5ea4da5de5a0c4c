/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * netblk wire protocol: the one definition of every constant and wire
 * struct shared by netblk.ko, tls-bridge and storaged.  The Python mirror
 * (lib/netblk/protocol/constants.py) is checked against this file by
 * tests/netblk/test_uapi_drift.py.  docs/protocol.md explains the rules.
 *
 * All multi-byte fields are big-endian.  Every struct is packed by layout
 * (no implicit padding) and its size is fixed by the protocol version.
 */
#ifndef _UAPI_LINUX_NETBLK_H
#define _UAPI_LINUX_NETBLK_H

#include <linux/types.h>

#define NETBLK_PROTO_VERSION		1
#define NETBLK_DEFAULT_PORT		10910

/* Magics ("NBLH", "NBLQ", "NBLR") open every frame. */
#define NETBLK_HELLO_MAGIC		0x4e424c48
#define NETBLK_REQUEST_MAGIC		0x4e424c51
#define NETBLK_REPLY_MAGIC		0x4e424c52

/* Limits. */
#define NETBLK_BLOCK_SIZE		4096
#define NETBLK_MAX_PAYLOAD		(1 << 20)
#define NETBLK_MAX_EXPORT_NAME		64
#define NETBLK_MAX_TOKEN		256
#define NETBLK_MIN_TOKEN		16

/* Request opcodes (struct netblk_request.opcode). */
#define NETBLK_CMD_READ			0
#define NETBLK_CMD_WRITE		1
#define NETBLK_CMD_FLUSH		2
#define NETBLK_CMD_TRIM			3
#define NETBLK_CMD_WRITE_ZEROES		4
#define NETBLK_CMD_DISCONNECT		5

/* Request flags (struct netblk_request.flags). */
#define NETBLK_CMD_FLAG_FUA		(1 << 0)	/* WRITE, TRIM, WRITE_ZEROES */
#define NETBLK_CMD_FLAG_NO_HOLE		(1 << 1)	/* WRITE_ZEROES */
#define NETBLK_CMD_FLAGS_ALL		0x0003

/* Export flags (struct netblk_hello_reply.export_flags). */
#define NETBLK_EXPORT_READ_ONLY		(1 << 0)
#define NETBLK_EXPORT_SEND_FLUSH	(1 << 1)
#define NETBLK_EXPORT_SEND_FUA		(1 << 2)
#define NETBLK_EXPORT_SEND_TRIM		(1 << 3)
#define NETBLK_EXPORT_SEND_WRITE_ZEROES	(1 << 4)
#define NETBLK_EXPORT_MULTI_CONN	(1 << 5)	/* see docs/protocol.md */

/* Login status (struct netblk_hello_reply.status). */
#define NETBLK_LOGIN_OK			0
#define NETBLK_LOGIN_BAD_VERSION	1
#define NETBLK_LOGIN_BAD_REQUEST	2
#define NETBLK_LOGIN_DENIED		3
#define NETBLK_LOGIN_NO_EXPORT		4
#define NETBLK_LOGIN_FORBIDDEN		5
#define NETBLK_LOGIN_RATE_LIMITED	6
#define NETBLK_LOGIN_UNAVAILABLE	7

/* Reply errors (struct netblk_reply.error); values are Linux errnos. */
#define NETBLK_EOK			0
#define NETBLK_EPERM			1
#define NETBLK_EIO			5
#define NETBLK_ENOMEM			12
#define NETBLK_EINVAL			22
#define NETBLK_ENOSPC			28
#define NETBLK_EOVERFLOW		75
#define NETBLK_ENOTSUP			95
#define NETBLK_ESHUTDOWN		108

/**
 * struct netblk_hello - login request, the first frame on a connection
 * @magic: NETBLK_HELLO_MAGIC
 * @version: NETBLK_PROTO_VERSION
 * @flags: client flags, zero in version 1
 * @export_len: bytes of export name following the struct
 * @token_len: bytes of token following the export name
 * @reserved: zero
 */
struct netblk_hello {
	__be32 magic;
	__be16 version;
	__be16 flags;
	__be16 export_len;
	__be16 token_len;
	__be32 reserved;
};

/**
 * struct netblk_hello_reply - login answer
 * @magic: NETBLK_HELLO_MAGIC
 * @version: the server's protocol version
 * @status: NETBLK_LOGIN_*; anything but OK is followed by a close
 * @export_size: export size in bytes, a multiple of @block_size
 * @block_size: smallest addressable unit, NETBLK_BLOCK_SIZE
 * @max_payload: largest READ or WRITE length the server takes
 * @export_flags: NETBLK_EXPORT_*
 * @max_inflight: requests the server takes at once on this connection
 */
struct netblk_hello_reply {
	__be32 magic;
	__be16 version;
	__be16 status;
	__be64 export_size;
	__be32 block_size;
	__be32 max_payload;
	__be32 export_flags;
	__be32 max_inflight;
};

/**
 * struct netblk_request - one I/O request; WRITE is followed by @length bytes
 * @magic: NETBLK_REQUEST_MAGIC
 * @flags: NETBLK_CMD_FLAG_*
 * @opcode: NETBLK_CMD_*
 * @handle: opaque, echoed in the reply
 * @offset: byte offset, a multiple of the block size
 * @length: bytes, a multiple of the block size (zero for FLUSH, DISCONNECT)
 * @reserved: zero
 */
struct netblk_request {
	__be32 magic;
	__be16 flags;
	__be16 opcode;
	__be64 handle;
	__be64 offset;
	__be32 length;
	__be32 reserved;
};

/**
 * struct netblk_reply - one answer; a successful READ is followed by the data
 * @magic: NETBLK_REPLY_MAGIC
 * @error: NETBLK_EOK or NETBLK_E*
 * @handle: the request's handle
 */
struct netblk_reply {
	__be32 magic;
	__be32 error;
	__be64 handle;
};

/*
 * Generic netlink family for the TLS handshake upcall (docs/architecture.md,
 * "Connection lifecycle").  Admin-only.  The driver multicasts READY on the
 * "handshake" group when a connected socket awaits its handshake; tls-bridge
 * sends ACCEPT, and the driver installs the socket as an fd in the caller
 * and answers with the device, peer, export, deadline and cookie; after TLS
 * and login the helper sends DONE with the cookie, the fd, the status and,
 * on success, what the server's HELLO reply said.
 */
#define NETBLK_GENL_NAME		"netblk"
#define NETBLK_GENL_VERSION		1
#define NETBLK_GENL_MCGRP_HANDSHAKE	"handshake"
#define NETBLK_GENL_REASON_MAX		128

enum netblk_genl_cmd {
	NETBLK_GENL_CMD_UNSPEC,
	NETBLK_GENL_CMD_READY,
	NETBLK_GENL_CMD_ACCEPT,
	NETBLK_GENL_CMD_DONE,
	__NETBLK_GENL_CMD_MAX,
};
#define NETBLK_GENL_CMD_MAX (__NETBLK_GENL_CMD_MAX - 1)

enum netblk_genl_attr {
	NETBLK_GENL_A_UNSPEC,
	NETBLK_GENL_A_PAD,
	NETBLK_GENL_A_DEVICE,		/* u32: N of /dev/netblkN */
	NETBLK_GENL_A_SOCKFD,		/* s32: the socket's fd in the helper */
	NETBLK_GENL_A_COOKIE,		/* u64: names one handshake attempt */
	NETBLK_GENL_A_PEER_ADDR,	/* string: server IP literal (v4 or v6) */
	NETBLK_GENL_A_PEER_PORT,	/* u16 */
	NETBLK_GENL_A_EXPORT,		/* string: export name */
	NETBLK_GENL_A_TIMEOUT_MS,	/* u32: handshake deadline from ACCEPT */
	NETBLK_GENL_A_STATUS,		/* u32: 0 or a positive errno */
	NETBLK_GENL_A_REASON,		/* string: failure, shown in sysfs */
	NETBLK_GENL_A_EXPORT_SIZE,	/* u64: bytes */
	NETBLK_GENL_A_EXPORT_FLAGS,	/* u32: NETBLK_EXPORT_* */
	NETBLK_GENL_A_MAX_PAYLOAD,	/* u32: bytes */
	NETBLK_GENL_A_MAX_INFLIGHT,	/* u32: requests */
	__NETBLK_GENL_A_MAX,
};
#define NETBLK_GENL_A_MAX (__NETBLK_GENL_A_MAX - 1)

/*
 * The driver's sysfs contract (/sys/block/netblkN/, kmod/README.md): the
 * ranges and defaults of its numeric attributes, the words "state" shows
 * and the keys "stats" shows, in order.  netblk_sysfs.c builds its
 * attributes from these; the admin API, its metrics and the tests' fake
 * driver take them from the Python mirror.
 */
#define NETBLK_MAX_SERVERS			8
#define NETBLK_REQUEST_TIMEOUT_MS_MIN		100
#define NETBLK_REQUEST_TIMEOUT_MS_MAX		3600000
#define NETBLK_REQUEST_TIMEOUT_MS_DEFAULT	30000
#define NETBLK_DEAD_TIMEOUT_MS_MIN		0
#define NETBLK_DEAD_TIMEOUT_MS_MAX		86400000
#define NETBLK_DEAD_TIMEOUT_MS_DEFAULT		30000
#define NETBLK_RECONNECT_RETRIES_MIN		0
#define NETBLK_RECONNECT_RETRIES_MAX		1000000
#define NETBLK_RECONNECT_RETRIES_DEFAULT	100

/* X(NAME, word): the connection states, in the order of their values. */
#define NETBLK_SYSFS_STATES(X)			\
	X(DISCONNECTED, disconnected)		\
	X(CONNECTING, connecting)		\
	X(HANDSHAKING, handshaking)		\
	X(CONNECTED, connected)			\
	X(RECONNECTING, reconnecting)		\
	X(ERROR, error)

/* X(key): the "stats" keys, in the order it shows them, one per line. */
#define NETBLK_SYSFS_STATS(X)			\
	X(read_bytes)				\
	X(write_bytes)				\
	X(read_requests)			\
	X(write_requests)			\
	X(flush_requests)			\
	X(discard_requests)			\
	X(write_zeroes_requests)		\
	X(errors)				\
	X(timeouts)				\
	X(reconnects)				\
	X(failovers)				\
	X(inflight)

#endif /* _UAPI_LINUX_NETBLK_H */
