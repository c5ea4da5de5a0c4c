// SPDX-License-Identifier: GPL-2.0
/*
 * netblk: kernel TCP sockets.  Create one with a file attached (so the
 * handshake helper can be given an fd for it), connect with a timeout,
 * send request frames, receive reply frames over kernel TLS, and run the
 * receive worker.
 *
 * By the time I/O starts the helper has installed kTLS TX and RX on the
 * socket: plain sendmsg/recvmsg here are encrypted and decrypted by the
 * kernel.  Every receive asks for the TLS record type and accepts only
 * application data; anything else (an alert, a KeyUpdate, a session
 * ticket) is fatal for the connection, as docs/protocol.md requires.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/blk-mq.h>
#include <linux/file.h>
#include <linux/net.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/tcp.h>
#include <linux/uio.h>
#include <net/inet_connection_sock.h>
#include <net/sock.h>
#include <net/tcp.h>
#include <net/tls.h>
#include <uapi/linux/tls.h>

#include "netblk.h"

static void netblk_sock_recv_work(struct work_struct *work);

/* Room for one TLS record-type control message (SOL_TLS, one byte). */
union netblk_tls_cmsg {
	struct cmsghdr cmsg;
	u8 buf[CMSG_SPACE(sizeof(u8))];
};

/* RFC 8446 6.1: a warning-level close_notify alert. */
#define NETBLK_TLS_RECORD_TYPE_ALERT	21
static const u8 netblk_close_notify[] = { 1, 0 };

/**
 * netblk_sock_create() - a new kernel TCP socket with a file
 * @dev: the device it will serve
 * @family: AF_INET or AF_INET6
 *
 * The socket lives in init_net.  The file holds it: the socket is released
 * when the last file reference (ours, or the helper's fd) goes away.
 *
 * Return: the connection with one reference, or ERR_PTR(-ENOMEM) or the
 * errno of sock_create_kern()/sock_alloc_file().
 */
struct netblk_sock *netblk_sock_create(struct netblk_dev *dev, int family)
{
	struct netblk_sock *nsock;
	struct socket *sock;
	struct file *file;
	struct sock *sk;
	int err;

	nsock = kzalloc(sizeof(*nsock), GFP_KERNEL);
	if (!nsock)
		return ERR_PTR(-ENOMEM);

	err = sock_create_kern(&init_net, family, SOCK_STREAM, IPPROTO_TCP,
			       &sock);
	if (err)
		goto out_free_nsock;

	/* On failure sock_alloc_file() releases the socket. */
	file = sock_alloc_file(sock, 0, NULL);
	if (IS_ERR(file)) {
		err = PTR_ERR(file);
		goto out_free_nsock;
	}

	sk = sock->sk;
	tcp_sock_set_nodelay(sk);
	sock_set_keepalive(sk);
	tcp_sock_set_keepidle(sk, 30);
	tcp_sock_set_keepintvl(sk, 10);
	tcp_sock_set_keepcnt(sk, 3);

	kref_init(&nsock->ns_ref);
	nsock->ns_dev = dev;
	nsock->ns_sock = sock;
	nsock->ns_file = file;
	mutex_init(&nsock->ns_tx_lock);
	atomic_long_set(&nsock->ns_inflight_bytes, 0);
	INIT_WORK(&nsock->ns_recv_work, netblk_sock_recv_work);
	init_completion(&nsock->ns_recv_done);
	return nsock;

out_free_nsock:
	kfree(nsock);
	return ERR_PTR(err);
}

static void netblk_sock_release(struct kref *ref)
{
	struct netblk_sock *nsock = container_of(ref, struct netblk_sock,
						 ns_ref);

	fput(nsock->ns_file);
	mutex_destroy(&nsock->ns_tx_lock);
	kfree(nsock);
}

/**
 * netblk_sock_get() - take a reference
 * @nsock: the connection
 */
void netblk_sock_get(struct netblk_sock *nsock)
{
	kref_get(&nsock->ns_ref);
}

/**
 * netblk_sock_put() - drop a reference; the last one closes our file
 * @nsock: the connection
 */
void netblk_sock_put(struct netblk_sock *nsock)
{
	kref_put(&nsock->ns_ref, netblk_sock_release);
}

/**
 * netblk_sock_connect() - TCP connect with a timeout
 * @nsock: a fresh connection
 * @addr: AF_INET or AF_INET6 address with the port set
 * @timeout_ms: give up after this long
 *
 * Blocks; netblk_sock_kill() from another thread aborts it.
 *
 * Context: process context, no locks held.
 * Return: 0 when connected; -ETIMEDOUT when @timeout_ms passed; the
 * errno of the connect otherwise (-ECONNREFUSED, -ENETUNREACH,
 * -EHOSTUNREACH, -ECONNABORTED after a kill, ...).
 */
int netblk_sock_connect(struct netblk_sock *nsock,
			const struct sockaddr_storage *addr,
			unsigned int timeout_ms)
{
	struct sock *sk = nsock->ns_sock->sk;
	int len = addr->ss_family == AF_INET6 ?
		  sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
	int err;

	WRITE_ONCE(sk->sk_sndtimeo, msecs_to_jiffies(timeout_ms));
	err = kernel_connect(nsock->ns_sock, (struct sockaddr *)addr, len, 0);
	WRITE_ONCE(sk->sk_sndtimeo, MAX_SCHEDULE_TIMEOUT);
	if (err == -EINPROGRESS || err == -EALREADY)
		err = -ETIMEDOUT;
	return err;
}

/**
 * netblk_sock_check_ktls() - is the socket connected with kTLS TX and RX?
 * @nsock: the connection the helper reported done
 *
 * The driver never sends block data in the clear: a DONE claiming success
 * on a socket without kernel TLS in both directions is refused.
 *
 * Return: 0 if so; -ENOTCONN if the socket is not established; -EPROTO if
 * the "tls" ULP or either direction's keys are missing.
 */
int netblk_sock_check_ktls(struct netblk_sock *nsock)
{
	struct sock *sk = nsock->ns_sock->sk;
	const struct inet_connection_sock *icsk = inet_csk(sk);
	struct tls_context *ctx;
	int err = 0;

	lock_sock(sk);
	if (sk->sk_state != TCP_ESTABLISHED) {
		err = -ENOTCONN;
	} else if (!icsk->icsk_ulp_ops ||
		   strcmp(icsk->icsk_ulp_ops->name, "tls")) {
		err = -EPROTO;
	} else {
		ctx = tls_get_ctx(sk);
		if (!ctx || ctx->tx_conf == TLS_BASE ||
		    ctx->rx_conf == TLS_BASE)
			err = -EPROTO;
	}
	release_sock(sk);
	return err;
}

/**
 * netblk_sock_dead() - has the connection been shut down?
 * @nsock: the connection
 *
 * Return: true once netblk_sock_fail() or netblk_sock_kill() ran.
 */
bool netblk_sock_dead(const struct netblk_sock *nsock)
{
	return test_bit(NETBLK_SOCK_DEAD, &nsock->ns_flags);
}

/**
 * netblk_sock_fail() - the connection broke: shut it down and tell the
 *	state machine
 * @nsock: the connection
 * @fmt: why, printf-style; the first reason sticks
 *
 * Safe from any process context, including the timeout handler and
 * queue_rq; idempotent.
 */
void netblk_sock_fail(struct netblk_sock *nsock, const char *fmt, ...)
{
	struct netblk_dev *dev = nsock->ns_dev;
	va_list args;

	if (test_and_set_bit(NETBLK_SOCK_DEAD, &nsock->ns_flags))
		return;

	spin_lock(&dev->nd_io_lock);
	va_start(args, fmt);
	vsnprintf(nsock->ns_reason, sizeof(nsock->ns_reason), fmt, args);
	va_end(args);
	spin_unlock(&dev->nd_io_lock);

	kernel_sock_shutdown(nsock->ns_sock, SHUT_RDWR);
	netblk_conn_sock_failed(dev);
}

/**
 * netblk_sock_kill() - shut the connection down without reporting it
 * @nsock: the connection
 *
 * Wakes a blocked connect, send or receive; they fail.  Idempotent.
 */
void netblk_sock_kill(struct netblk_sock *nsock)
{
	set_bit(NETBLK_SOCK_DEAD, &nsock->ns_flags);
	kernel_sock_shutdown(nsock->ns_sock, SHUT_RDWR);
}

/**
 * netblk_sock_reason() - copy out why the connection died
 * @nsock: the connection
 * @buf: destination
 * @len: size of @buf
 */
void netblk_sock_reason(struct netblk_sock *nsock, char *buf, size_t len)
{
	struct netblk_dev *dev = nsock->ns_dev;

	spin_lock(&dev->nd_io_lock);
	strscpy(buf, nsock->ns_reason[0] ? nsock->ns_reason : "closed", len);
	spin_unlock(&dev->nd_io_lock);
}

/*
 * One sendmsg on behalf of the block layer: its allocations must neither
 * recurse into I/O reclaim nor fail under memory pressure.
 */
static int netblk_sock_sendmsg(struct netblk_sock *nsock, struct msghdr *msg)
{
	struct sock *sk = nsock->ns_sock->sk;
	unsigned int noreclaim;
	int ret;

	noreclaim = memalloc_noreclaim_save();
	sk->sk_allocation = GFP_NOIO | __GFP_MEMALLOC;
	sk->sk_use_task_frag = false;
	ret = sock_sendmsg(nsock->ns_sock, msg);
	memalloc_noreclaim_restore(noreclaim);
	return ret;
}

static int netblk_sock_xmit(struct netblk_sock *nsock, struct iov_iter *iter,
			    int flags, int *sent)
{
	struct msghdr msg = { };
	int ret;

	msg.msg_iter = *iter;
	while (msg_data_left(&msg)) {
		msg.msg_flags = flags | MSG_NOSIGNAL;
		ret = netblk_sock_sendmsg(nsock, &msg);
		if (ret <= 0)
			return ret ? ret : -EPIPE;
		*sent += ret;
	}
	return 0;
}

/**
 * netblk_sock_send_rq() - send one request frame, with a WRITE's data
 * @nsock: the live connection
 * @rq: the request
 * @hdr: its wire header, handle included
 * @more: more frames follow at once: leave the TLS record open
 * @sent: in/out: bytes of this frame handed to the socket so far
 *
 * Takes ns_tx_lock, so frames never interleave.  With @more, kTLS keeps
 * the frame in its open record (MSG_MORE) so that a batch of requests is
 * sealed and sent as one record; the caller must end the batch with a
 * frame sent without @more or with netblk_sock_push().  A partly sent frame
 * leaves the stream unusable: the caller must fail the connection unless
 * *@sent is still 0.
 *
 * Context: process context, may sleep; the command's lock is held.
 * Return: 0 on success; -EPIPE if the connection is dead; -ERESTARTSYS or
 * -EINTR when a signal interrupted the submitter; another negative errno
 * from sock_sendmsg().
 */
int netblk_sock_send_rq(struct netblk_sock *nsock, struct request *rq,
			const struct netblk_request *hdr, bool more, int *sent)
{
	bool data = req_op(rq) == REQ_OP_WRITE && blk_rq_bytes(rq);
	int last_flags = more ? MSG_MORE : 0;
	struct kvec kv = {
		.iov_base = (void *)hdr,
		.iov_len = sizeof(*hdr),
	};
	struct iov_iter from;
	struct bio *bio;
	int err;

	mutex_lock(&nsock->ns_tx_lock);
	if (netblk_sock_dead(nsock)) {
		err = -EPIPE;
		goto out_unlock;
	}

	iov_iter_kvec(&from, ITER_SOURCE, &kv, 1, sizeof(*hdr));
	err = netblk_sock_xmit(nsock, &from, data ? MSG_MORE : last_flags,
			       sent);
	if (err || !data)
		goto out_unlock;

	for (bio = rq->bio; bio; bio = bio->bi_next) {
		struct bio *next = bio->bi_next;
		struct bvec_iter iter;
		struct bio_vec bvec;

		bio_for_each_segment(bvec, bio, iter) {
			bool last = !next && bio_iter_last(bvec, iter);

			iov_iter_bvec(&from, ITER_SOURCE, &bvec, 1,
				      bvec.bv_len);
			err = netblk_sock_xmit(nsock, &from,
					       last ? last_flags : MSG_MORE,
					       sent);
			if (err)
				goto out_unlock;
		}
	}

out_unlock:
	mutex_unlock(&nsock->ns_tx_lock);
	return err;
}

/*
 * Send @len bytes of @data as a TLS record of @type, after pushing the
 * record kTLS has open.  Return: as sock_sendmsg().
 */
static int netblk_sock_send_record(struct netblk_sock *nsock, u8 type,
				   const void *data, size_t len)
{
	union netblk_tls_cmsg ctl = { };
	struct kvec kv = { .iov_base = (void *)data, .iov_len = len };
	struct msghdr msg = {
		.msg_control = &ctl,
		.msg_controllen = sizeof(ctl),
		.msg_flags = MSG_NOSIGNAL,
	};

	lockdep_assert_held(&nsock->ns_tx_lock);
	ctl.cmsg.cmsg_level = SOL_TLS;
	ctl.cmsg.cmsg_type = TLS_SET_RECORD_TYPE;
	ctl.cmsg.cmsg_len = CMSG_LEN(sizeof(u8));
	*(u8 *)CMSG_DATA(&ctl.cmsg) = type;
	iov_iter_kvec(&msg.msg_iter, ITER_SOURCE, &kv, len ? 1 : 0, len);
	return netblk_sock_sendmsg(nsock, &msg);
}

/**
 * netblk_sock_push() - seal and send the open TLS record
 * @nsock: the live connection
 *
 * Ends a batch whose last frame went out with @more (blk-mq's commit_rqs).
 * A send of no data does not close a kTLS record on 6.1 (splice_eof came
 * in 6.5), but setting the record type does: kTLS first pushes the record
 * it has open, and no empty record follows since no data is given.
 *
 * Context: process context, may sleep.
 * Return: 0 (also when nothing was open); -EPIPE if the connection is
 * dead; another negative errno from sock_sendmsg().
 */
int netblk_sock_push(struct netblk_sock *nsock)
{
	int err = -EPIPE;

	mutex_lock(&nsock->ns_tx_lock);
	if (!netblk_sock_dead(nsock))
		err = netblk_sock_send_record(nsock, TLS_RECORD_TYPE_DATA,
					      NULL, 0);
	mutex_unlock(&nsock->ns_tx_lock);
	return err;
}

/**
 * netblk_sock_disconnect() - say goodbye: DISCONNECT, close_notify, FIN
 * @nsock: the live connection, with nothing in flight
 *
 * Sends NETBLK_CMD_DISCONNECT, then a TLS close_notify alert (RFC 8446
 * 6.1: the stream ends here, not cut short), and shuts down our sending
 * side; the server flushes and closes, and the receive worker sees the
 * end of the stream (see netblk_sock_wait_closed()).
 *
 * Context: process context, may sleep.
 * Return: 0 when sent; -EPIPE if the connection is dead; another negative
 * errno from sock_sendmsg().
 */
int netblk_sock_disconnect(struct netblk_sock *nsock)
{
	struct netblk_request hdr = {
		.magic = cpu_to_be32(NETBLK_REQUEST_MAGIC),
		.opcode = cpu_to_be16(NETBLK_CMD_DISCONNECT),
	};
	struct kvec kv = { .iov_base = &hdr, .iov_len = sizeof(hdr) };
	struct iov_iter from;
	int sent = 0;
	int err = -EPIPE;

	mutex_lock(&nsock->ns_tx_lock);
	if (!netblk_sock_dead(nsock)) {
		iov_iter_kvec(&from, ITER_SOURCE, &kv, 1, sizeof(hdr));
		err = netblk_sock_xmit(nsock, &from, 0, &sent);
	}
	if (!err) {
		err = netblk_sock_send_record(nsock,
					      NETBLK_TLS_RECORD_TYPE_ALERT,
					      netblk_close_notify,
					      sizeof(netblk_close_notify));
		err = err < 0 ? err : 0;
	}
	mutex_unlock(&nsock->ns_tx_lock);
	if (!err)
		kernel_sock_shutdown(nsock->ns_sock, SHUT_WR);
	return err;
}

/**
 * netblk_sock_wait_closed() - wait for the server to close after DISCONNECT
 * @nsock: a connection netblk_sock_disconnect() said goodbye on
 * @deadline: jiffies after which to stop waiting
 *
 * Context: process context, may sleep.
 */
void netblk_sock_wait_closed(struct netblk_sock *nsock, unsigned long deadline)
{
	long left = (long)(deadline - jiffies);

	if (left > 0)
		wait_for_completion_timeout(&nsock->ns_recv_done, left);
}

/*
 * Receive exactly iov_iter_count(@iter) bytes of application data.
 * Return: 0; -ESHUTDOWN at the end of the stream; -EPROTO if the socket
 * does not report TLS record types (no kTLS RX); -EBADMSG with *@type set
 * for a record that is not application data; another negative errno from
 * sock_recvmsg().
 */
static int netblk_sock_recv(struct netblk_sock *nsock, struct iov_iter *iter,
			    u8 *type)
{
	union netblk_tls_cmsg ctl;
	struct msghdr msg = { };
	unsigned int noreclaim;
	int ret = 0;

	msg.msg_iter = *iter;
	noreclaim = memalloc_noreclaim_save();
	while (msg_data_left(&msg)) {
		nsock->ns_sock->sk->sk_allocation = GFP_NOIO | __GFP_MEMALLOC;
		memset(&ctl, 0, sizeof(ctl));
		msg.msg_control = &ctl;
		msg.msg_controllen = sizeof(ctl);
		msg.msg_flags = 0;
		ret = sock_recvmsg(nsock->ns_sock, &msg, MSG_WAITALL);
		if (ret <= 0) {
			if (!ret)
				ret = -ESHUTDOWN;
			break;
		}
		ret = 0;
		/* put_cmsg() consumed the buffer if it wrote a record type. */
		if (msg.msg_controllen || ctl.cmsg.cmsg_level != SOL_TLS ||
		    ctl.cmsg.cmsg_type != TLS_GET_RECORD_TYPE) {
			ret = -EPROTO;
			break;
		}
		*type = *(u8 *)CMSG_DATA(&ctl.cmsg);
		if (*type != TLS_RECORD_TYPE_DATA) {
			ret = -EBADMSG;
			break;
		}
	}
	memalloc_noreclaim_restore(noreclaim);
	return ret;
}

static void netblk_sock_recv_failed(struct netblk_sock *nsock, int err,
				    u8 type)
{
	switch (err) {
	case -ESHUTDOWN:
		netblk_sock_fail(nsock, "server closed the connection");
		break;
	case -EPROTO:
		netblk_sock_fail(nsock, "no TLS record type on receive (kTLS RX not active)");
		break;
	case -EBADMSG:
		netblk_sock_fail(nsock, "TLS record of type %u instead of application data",
				 type);
		break;
	default:
		netblk_sock_fail(nsock, "receive failed (error %d)", err);
		break;
	}
}

/**
 * netblk_sock_recv_rq() - receive a READ's data into the request's pages
 * @nsock: the live connection
 * @rq: the READ request, locked and INFLIGHT
 *
 * On failure the connection is failed with the reason.
 *
 * Context: the receive worker.
 * Return: 0, or a negative errno as for the reply header.
 */
int netblk_sock_recv_rq(struct netblk_sock *nsock, struct request *rq)
{
	struct req_iterator iter;
	struct bio_vec bvec;
	struct iov_iter to;
	u8 type = 0;
	int err;

	rq_for_each_segment(bvec, rq, iter) {
		iov_iter_bvec(&to, ITER_DEST, &bvec, 1, bvec.bv_len);
		err = netblk_sock_recv(nsock, &to, &type);
		if (err) {
			netblk_sock_recv_failed(nsock, err, type);
			return err;
		}
	}
	return 0;
}

static void netblk_sock_recv_work(struct work_struct *work)
{
	struct netblk_sock *nsock = container_of(work, struct netblk_sock,
						 ns_recv_work);
	struct netblk_reply reply;
	struct kvec kv = { .iov_base = &reply, .iov_len = sizeof(reply) };
	struct iov_iter to;
	u8 type = 0;
	int err;

	while (!netblk_sock_dead(nsock)) {
		iov_iter_kvec(&to, ITER_DEST, &kv, 1, sizeof(reply));
		err = netblk_sock_recv(nsock, &to, &type);
		if (err) {
			netblk_sock_recv_failed(nsock, err, type);
			break;
		}
		if (netblk_blk_handle_reply(nsock, &reply))
			break;
	}
	complete_all(&nsock->ns_recv_done);
}

/**
 * netblk_sock_start_recv() - start the receive worker
 * @nsock: the connection, just established
 *
 * The worker runs until the connection dies; whoever resets the
 * connection flushes it before dropping the device's reference.
 */
void netblk_sock_start_recv(struct netblk_sock *nsock)
{
	queue_work(nsock->ns_dev->nd_recv_wq, &nsock->ns_recv_work);
}
