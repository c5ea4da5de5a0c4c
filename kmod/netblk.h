/* SPDX-License-Identifier: GPL-2.0 */
/*
 * netblk: TLS-secured network block device, private definitions.
 *
 * Objects and their locks (outer to inner):
 *
 *   netblk_dev.nd_ctl_lock   connect/disconnect requests (sysfs, unload)
 *   netblk_dev.nd_lock       configuration and connection state machine
 *   netblk_hs_lock           the global list of pending handshakes
 *   netblk_cmd.nc_lock       one request against send, receive and timeout
 *   netblk_queue.nq_lock     a hardware queue's dispatch batch
 *   netblk_sock.ns_tx_lock   one frame at a time on a socket
 *   netblk_dev.nd_io_lock    the I/O path's view of the state (spinlock)
 *
 * The generic netlink handlers run under genl_mutex and take
 * netblk_hs_lock, then nd_lock (never while holding netblk_hs_lock).
 * Nothing that the block layer waits for (queue_rq, the receive worker,
 * the timeout handler) takes nd_lock.
 */
#ifndef NETBLK_H
#define NETBLK_H

#include <linux/atomic.h>
#include <linux/blk-mq.h>
#include <linux/completion.h>
#include <linux/inet.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/socket.h>
#include <linux/spinlock.h>
#include <linux/types.h>
#include <linux/workqueue.h>

#include <uapi/linux/netblk.h>

#define NETBLK_MAX_DEVICES		16
#define NETBLK_MAX_CONNECTIONS		16
/* "[v6 address]:65535" and a NUL */
#define NETBLK_SERVER_STRLEN		(INET6_ADDRSTRLEN + 8)
#define NETBLK_MAX_QUEUE_DEPTH		1024
#define NETBLK_MINORS			16
#define NETBLK_ERROR_LEN		256
#define NETBLK_REASON_LEN		128
#define NETBLK_BACKOFF_MIN_MS		100
#define NETBLK_BACKOFF_MAX_MS		5000
#define NETBLK_DISCONNECT_WAIT_MS	2000
#define NETBLK_DRAIN_MAX_MS		30000
/*
 * Times a request is sent again after the connection it was sent on died
 * (nvme's default nvme_max_retries); the next loss fails it with EIO, so a
 * request that kills every server it reaches ends instead of looping.
 */
#define NETBLK_MAX_RESENDS		5
/* The largest export the block layer can address: an loff_t of bytes. */
#define NETBLK_MAX_EXPORT_SIZE \
	round_down((u64)MAX_LFS_FILESIZE, NETBLK_BLOCK_SIZE)
/*
 * A batch leaves its queue's connection when that has this much more
 * payload in flight than the least loaded one: see netblk_conn_choose().
 */
#define NETBLK_SPILL_BYTES		(1UL << 20)

/* A TRIM or WRITE_ZEROES length must fit the 32-bit length field. */
#define NETBLK_MAX_RANGE_SECTORS \
	(round_down(U32_MAX, NETBLK_BLOCK_SIZE) >> SECTOR_SHIFT)

#define NETBLK_STATE_ENUM(name, word)	NETBLK_##name,

/**
 * enum netblk_state - connection state, shown in sysfs "state" (the list:
 *	NETBLK_SYSFS_STATES in the UAPI header)
 * @NETBLK_DISCONNECTED: idle; no socket, capacity 0
 * @NETBLK_CONNECTING: first TCP connect in progress
 * @NETBLK_HANDSHAKING: first handshake posted to tls-bridge
 * @NETBLK_CONNECTED: I/O flows
 * @NETBLK_RECONNECTING: connection lost; I/O waits while we reconnect
 * @NETBLK_ERROR: gave up; I/O fails until the next connect
 * @NETBLK_NR_STATES: number of states
 */
enum netblk_state {
	NETBLK_SYSFS_STATES(NETBLK_STATE_ENUM)
	NETBLK_NR_STATES,
};

/**
 * struct netblk_server - one entry of the server list
 * @sv_addr: its IP address, AF_INET or AF_INET6; the port field unused
 * @sv_port: its TCP port; 0 for server_port's
 */
struct netblk_server {
	struct sockaddr_storage sv_addr;
	u16 sv_port;
};

/**
 * struct netblk_conf - what sysfs configures for the next connect
 * @cf_servers: the server list, tried in order; see netblk_conn.c
 * @cf_nr_servers: entries in @cf_servers; 0 until set
 * @cf_port: server TCP port of entries that name none (server_port)
 * @cf_export: export name, NUL-terminated; empty until set
 * @cf_request_timeout_ms: a request in flight longer than this kills the
 *	connection (it is requeued, not failed)
 * @cf_dead_timeout_ms: how long I/O waits for a reconnect before failing
 * @cf_reconnect_retries: reconnect attempts per outage before failing
 */
struct netblk_conf {
	struct netblk_server cf_servers[NETBLK_MAX_SERVERS];
	unsigned int cf_nr_servers;
	u16 cf_port;
	char cf_export[NETBLK_MAX_EXPORT_NAME + 1];
	u32 cf_request_timeout_ms;
	u32 cf_dead_timeout_ms;
	u32 cf_reconnect_retries;
};

/**
 * struct netblk_stats - counters shown in sysfs "stats"
 * @st_read_bytes: bytes read successfully
 * @st_write_bytes: bytes written successfully
 * @st_read_requests: READ replies received
 * @st_write_requests: WRITE replies received
 * @st_flush_requests: FLUSH replies received
 * @st_discard_requests: TRIM replies received
 * @st_write_zeroes_requests: WRITE_ZEROES replies received
 * @st_errors: requests completed with an error
 * @st_timeouts: requests that hit the request timeout
 * @st_reconnects: connection losses that started a reconnect
 * @st_failovers: connections made to another server than the one before
 * @st_inflight: requests sent and not yet answered
 */
struct netblk_stats {
	atomic64_t st_read_bytes;
	atomic64_t st_write_bytes;
	atomic64_t st_read_requests;
	atomic64_t st_write_requests;
	atomic64_t st_flush_requests;
	atomic64_t st_discard_requests;
	atomic64_t st_write_zeroes_requests;
	atomic64_t st_errors;
	atomic64_t st_timeouts;
	atomic64_t st_reconnects;
	atomic64_t st_failovers;
	atomic64_t st_inflight;
};

/**
 * struct netblk_params - what the helper's DONE says about the export
 * @np_export_size: bytes, a multiple of NETBLK_BLOCK_SIZE
 * @np_export_flags: NETBLK_EXPORT_*
 * @np_max_payload: largest READ/WRITE, a multiple of NETBLK_BLOCK_SIZE
 * @np_max_inflight: requests the server takes at once (informational)
 */
struct netblk_params {
	u64 np_export_size;
	u32 np_export_flags;
	u32 np_max_payload;
	u32 np_max_inflight;
};

/* netblk_sock.ns_flags bits */
#define NETBLK_SOCK_DEAD	0	/* shut down; no more frames */

/**
 * struct netblk_sock - one TCP connection, from connect to close
 * @ns_ref: references: the device's, a handshake request's, transient ones
 * @ns_dev: the device this connection serves
 * @ns_sock: the kernel socket
 * @ns_file: the socket's file; holds the socket, put on release
 * @ns_tx_lock: protects sending on @ns_sock: one whole frame at a time
 * @ns_flags: NETBLK_SOCK_* bits
 * @ns_reason: why the connection died; protected by nd_io_lock
 * @ns_params: export parameters, set once by the handshake's DONE
 * @ns_hs_cookie: cookie of this connection's pending handshake, 0 if none;
 *	protected by nd_lock
 * @ns_inflight_bytes: READ and WRITE payload sent on this connection and
 *	not yet answered, requeued or failed; see netblk_conn_choose()
 * @ns_recv_work: the receive worker, runs while connected
 * @ns_recv_done: completed when the receive worker returns
 */
struct netblk_sock {
	struct kref ns_ref;
	struct netblk_dev *ns_dev;
	struct socket *ns_sock;
	struct file *ns_file;
	struct mutex ns_tx_lock;	/* protects sending: whole frames */
	unsigned long ns_flags;
	char ns_reason[NETBLK_REASON_LEN];
	struct netblk_params ns_params;
	u64 ns_hs_cookie;
	atomic_long_t ns_inflight_bytes;
	struct work_struct ns_recv_work;
	struct completion ns_recv_done;
};

/* netblk_cmd.nc_flags bits */
#define NETBLK_CMD_INFLIGHT	0	/* sent; its reply is awaited */
#define NETBLK_CMD_STUCK	1	/* timed out once while locked */

/**
 * struct netblk_cmd - per-request driver data (blk-mq PDU)
 * @nc_dev: the device
 * @nc_lock: protects the fields below against queue_rq, the receive worker,
 *	the timeout handler and connection resets
 * @nc_nsock: the connection the request was sent on (while INFLIGHT)
 * @nc_flags: NETBLK_CMD_* bits
 * @nc_cookie: bumped per send; the handle's upper half, so a reply to an
 *	older send of the same tag is recognised
 * @nc_status: completion status
 */
struct netblk_cmd {
	struct netblk_dev *nc_dev;
	struct mutex nc_lock;		/* protects this command */
	struct netblk_sock *nc_nsock;
	unsigned long nc_flags;
	u32 nc_cookie;
	u8 nc_resends;		/* sends after a lost connection; < NETBLK_MAX_RESENDS */
	blk_status_t nc_status;
};

/**
 * struct netblk_queue - per hardware queue driver data
 * @nq_lock: protects @nq_open; held across a send, so that two contexts
 *	dispatching on one queue never lose track of an open record
 * @nq_open: the connection on which this queue's current dispatch batch
 *	left its TLS record open (MSG_MORE), with a reference; NULL between
 *	batches.  The rest of the batch follows it there, and its end (the
 *	request blk-mq marks last, or commit_rqs) pushes the record.
 */
struct netblk_queue {
	struct mutex nq_lock;		/* protects nq_open */
	struct netblk_sock *nq_open;
};

/**
 * struct netblk_hs_req - a connected socket awaiting its TLS handshake
 * @hr_list: entry on the pending list, protected by netblk_hs_lock
 * @hr_ref: the list's reference plus transient ones
 * @hr_cookie: names this attempt in ACCEPT and DONE; never 0
 * @hr_dev: the device (outlives every request: see netblk_exit())
 * @hr_nsock: the connection; holds a reference
 * @hr_accepted: a helper has the fd; protected by netblk_hs_lock
 * @hr_deadline: jiffies by which DONE must arrive
 * @hr_peer: server address as text, for ACCEPT
 * @hr_port: server port, for ACCEPT
 * @hr_export: export name, for ACCEPT
 */
struct netblk_hs_req {
	struct list_head hr_list;
	struct kref hr_ref;
	u64 hr_cookie;
	struct netblk_dev *hr_dev;
	struct netblk_sock *hr_nsock;
	bool hr_accepted;
	unsigned long hr_deadline;
	char hr_peer[INET6_ADDRSTRLEN];
	u16 hr_port;
	char hr_export[NETBLK_MAX_EXPORT_NAME + 1];
};

/**
 * struct netblk_dev - one /dev/netblkN
 * @nd_index: N
 * @nd_nr_conns: connections per device, one per hardware queue
 * @nd_disk: the gendisk; its queue is nd_disk->queue
 * @nd_tag_set: blk-mq tag set
 * @nd_queues: per hardware queue state, @nd_nr_conns of them
 * @nd_ctl_wq: ordered workqueue for the connection state machine
 * @nd_recv_wq: workqueue for the receive worker
 * @nd_ctl_lock: serialises connect, disconnect and unload
 * @nd_lock: protects @nd_conf, @nd_socks, @nd_error, the handshake and
 *	reconnect fields below, @nd_disconnecting, @nd_dying, and every write
 *	of @nd_state and @nd_live
 * @nd_io_lock: protects @nd_live, @nd_state and ns_reason for readers that
 *	cannot take @nd_lock; writers hold both
 * @nd_state: enum netblk_state
 * @nd_live: per hardware queue, its own connection (where its batches go
 *	unless it is much busier than another); set only while
 *	CONNECTED, all together; borrows @nd_socks' references
 * @nd_socks: the connection set, or the attempt at one; NULL-terminated
 *	when shorter than @nd_nr_conns
 * @nd_conf: configuration
 * @nd_error: last error, in words
 * @nd_hs_pending: handshakes of the attempt still awaiting their DONE
 * @nd_hs_deadline: jiffies by which they must be done
 * @nd_server: index in the server list of the server the connection set,
 *	or the attempt at one, is for
 * @nd_last_server: index of the server last connected to, -1 for none
 *	since the last connect
 * @nd_attempts: connect attempts in this outage (or first connect),
 *	failed ones and reconnects that answered nothing
 * @nd_backoff_ms: delay before the next reconnect attempt
 * @nd_dead_deadline: jiffies at which this outage fails all I/O
 * @nd_outage: an outage began since the last connect; a loss continues it
 *	(keeps its deadline and attempts) unless the set lost answered a
 *	request or was never sent one
 * @nd_asked: a request was sent on the connection set (written by senders)
 * @nd_answered: a reply completed a request on the connection set (written
 *	by the receive workers)
 * @nd_disconnecting: a disconnect is draining I/O; do not reconnect
 * @nd_dying: the module is unloading; refuse connect
 * @nd_connect_work: creates the socket and connects (also the retry timer)
 * @nd_err_work: handles a failed connection
 * @nd_hs_timeout_work: handshake deadline
 * @nd_dead_work: dead-connection deadline
 * @nd_stats: counters
 */
struct netblk_dev {
	unsigned int nd_index;
	unsigned int nd_nr_conns;
	struct gendisk *nd_disk;
	struct blk_mq_tag_set nd_tag_set;
	struct netblk_queue nd_queues[NETBLK_MAX_CONNECTIONS];
	struct workqueue_struct *nd_ctl_wq;
	struct workqueue_struct *nd_recv_wq;

	struct mutex nd_ctl_lock;	/* serialises connect/disconnect */
	struct mutex nd_lock;		/* protects the state machine */
	spinlock_t nd_io_lock;		/* protects nd_live, nd_state */
	enum netblk_state nd_state;
	struct netblk_sock *nd_live[NETBLK_MAX_CONNECTIONS];
	struct netblk_sock *nd_socks[NETBLK_MAX_CONNECTIONS];

	struct netblk_conf nd_conf;
	char nd_error[NETBLK_ERROR_LEN];
	unsigned int nd_hs_pending;
	unsigned long nd_hs_deadline;
	unsigned int nd_server;
	int nd_last_server;
	unsigned int nd_attempts;
	unsigned int nd_backoff_ms;
	unsigned long nd_dead_deadline;
	bool nd_outage;
	bool nd_asked;
	bool nd_answered;
	bool nd_disconnecting;
	bool nd_dying;

	struct delayed_work nd_connect_work;
	struct work_struct nd_err_work;
	struct delayed_work nd_hs_timeout_work;
	struct delayed_work nd_dead_work;

	struct netblk_stats nd_stats;
};

/* netblk_main.c */
extern unsigned int netblk_handshake_timeout_ms;
extern unsigned int netblk_connect_timeout_ms;
extern unsigned int netblk_queue_depth;
extern unsigned int netblk_connections;
extern int netblk_major;

/* netblk_blk.c */
int netblk_blk_init(struct netblk_dev *dev);
void netblk_blk_exit(struct netblk_dev *dev);
int netblk_blk_add(struct netblk_dev *dev);
void netblk_blk_del(struct netblk_dev *dev);
void netblk_blk_apply(struct netblk_dev *dev, const struct netblk_params *p);
void netblk_blk_clear(struct netblk_dev *dev);
void netblk_blk_set_timeout(struct netblk_dev *dev, u32 timeout_ms);
void netblk_blk_reset_inflight(struct netblk_dev *dev);
int netblk_blk_handle_reply(struct netblk_sock *nsock,
			    const struct netblk_reply *reply);

/* netblk_sock.c */
struct netblk_sock *netblk_sock_create(struct netblk_dev *dev, int family);
void netblk_sock_get(struct netblk_sock *nsock);
void netblk_sock_put(struct netblk_sock *nsock);
int netblk_sock_connect(struct netblk_sock *nsock,
			const struct sockaddr_storage *addr,
			unsigned int timeout_ms);
int netblk_sock_check_ktls(struct netblk_sock *nsock);
__printf(2, 3)
void netblk_sock_fail(struct netblk_sock *nsock, const char *fmt, ...);
void netblk_sock_kill(struct netblk_sock *nsock);
bool netblk_sock_dead(const struct netblk_sock *nsock);
void netblk_sock_reason(struct netblk_sock *nsock, char *buf, size_t len);
int netblk_sock_send_rq(struct netblk_sock *nsock, struct request *rq,
			const struct netblk_request *hdr, bool more, int *sent);
int netblk_sock_push(struct netblk_sock *nsock);
int netblk_sock_disconnect(struct netblk_sock *nsock);
void netblk_sock_wait_closed(struct netblk_sock *nsock, unsigned long deadline);
int netblk_sock_recv_rq(struct netblk_sock *nsock, struct request *rq);
void netblk_sock_start_recv(struct netblk_sock *nsock);

/* netblk_conn.c */
void netblk_conn_init(struct netblk_dev *dev);
void netblk_conn_exit(struct netblk_dev *dev);
void netblk_conn_stop(struct netblk_dev *dev);
int netblk_conn_connect(struct netblk_dev *dev);
int netblk_conn_disconnect(struct netblk_dev *dev);
bool netblk_conn_idle(const struct netblk_dev *dev);
enum netblk_state netblk_conn_state(struct netblk_dev *dev);
const char *netblk_conn_state_name(enum netblk_state state);
void netblk_conn_sock_failed(struct netblk_dev *dev);
void netblk_conn_format_addr(const struct sockaddr_storage *ss, char *buf,
			     size_t len);
void netblk_conn_format_server(const struct netblk_conf *cf, unsigned int i,
			       char *buf, size_t len);
int netblk_conn_current_server(struct netblk_dev *dev, char *buf,
			       size_t len);
struct netblk_sock *netblk_conn_choose(struct netblk_dev *dev,
				       unsigned int hwq);
bool netblk_conn_requeue(struct netblk_dev *dev, struct request *rq);
unsigned int netblk_conn_count(struct netblk_dev *dev);
void netblk_hs_init(void);
struct netblk_hs_req *netblk_hs_accept(void);
void netblk_hs_unaccept(struct netblk_hs_req *req);
void netblk_hs_put(struct netblk_hs_req *req);
u32 netblk_hs_remaining_ms(const struct netblk_hs_req *req);
int netblk_hs_done(u64 cookie, struct file *file, u32 status,
		   const char *reason, const struct netblk_params *p);

/* netblk_sysfs.c */
extern const struct attribute_group *netblk_attr_groups[];

/* netblk_netlink.c */
int netblk_genl_init(void);
void netblk_genl_exit(void);
bool netblk_genl_has_listener(void);
int netblk_genl_ready(u32 device);

#endif /* NETBLK_H */
