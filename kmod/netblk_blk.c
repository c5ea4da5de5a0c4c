// SPDX-License-Identifier: GPL-2.0
/*
 * netblk: the block layer side: blk-mq operations, the gendisk and its
 * queue limits, request <-> wire mapping and reply handling.
 *
 * A request's handle is (nc_cookie << 32) | blk_mq_unique_tag(rq).  The
 * cookie is bumped on every send, so a reply that names an older send of
 * the same tag is recognised as a protocol error rather than completing the
 * wrong request.
 *
 * The life of a request: queue_rq locks the command, sends it under the
 * socket's tx_lock and marks it INFLIGHT.  A dispatch batch (the requests
 * blk-mq hands over until one marked last) goes to one connection, chosen
 * when it starts (netblk_conn_choose()), and leaves there in one TLS
 * record.  The receive worker finds a request by handle, locks it,
 * receives READ data straight into the bio pages, clears INFLIGHT and
 * completes it.  When the connection fails, every INFLIGHT
 * command is requeued (while reconnecting) or failed (otherwise), by
 * whoever first clears INFLIGHT under the command's lock: the timeout
 * handler, a failed send, or the connection reset.  A request is sent
 * again at most NETBLK_MAX_RESENDS times (netblk_resend()).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/module.h>
#include <linux/percpu-refcount.h>

#include "netblk.h"
#include "netblk_trace.h"

static const struct block_device_operations netblk_fops = {
	.owner = THIS_MODULE,
};

static u64 netblk_handle(struct netblk_cmd *cmd, struct request *rq)
{
	return ((u64)cmd->nc_cookie << 32) | blk_mq_unique_tag(rq);
}

static blk_status_t netblk_error_to_status(u32 error)
{
	switch (error) {
	case NETBLK_EOK:
		return BLK_STS_OK;
	case NETBLK_ENOSPC:
		return BLK_STS_NOSPC;
	case NETBLK_ENOTSUP:
		return BLK_STS_NOTSUPP;
	default:
		return BLK_STS_IOERR;
	}
}

/* What a request adds to its connection's ns_inflight_bytes. */
static long netblk_payload(struct netblk_cmd *cmd)
{
	struct request *rq = blk_mq_rq_from_pdu(cmd);

	switch (req_op(rq)) {
	case REQ_OP_READ:
	case REQ_OP_WRITE:
		return blk_rq_bytes(rq);
	default:
		return 0;
	}
}

/* @nsock: where the command is being sent */
static void netblk_inflight_set(struct netblk_dev *dev, struct netblk_cmd *cmd,
				struct netblk_sock *nsock)
{
	cmd->nc_nsock = nsock;
	set_bit(NETBLK_CMD_INFLIGHT, &cmd->nc_flags);
	atomic_long_add(netblk_payload(cmd), &nsock->ns_inflight_bytes);
	atomic64_inc(&dev->nd_stats.st_inflight);
}

static bool netblk_inflight_clear(struct netblk_dev *dev,
				  struct netblk_cmd *cmd)
{
	lockdep_assert_held(&cmd->nc_lock);
	if (!test_and_clear_bit(NETBLK_CMD_INFLIGHT, &cmd->nc_flags))
		return false;
	/* nc_nsock outlives INFLIGHT: see netblk_conn_reset(). */
	atomic_long_sub(netblk_payload(cmd), &cmd->nc_nsock->ns_inflight_bytes);
	atomic64_dec(&dev->nd_stats.st_inflight);
	return true;
}

/*
 * Build the wire header for @rq.  Return: BLK_STS_OK, or the status to
 * fail the request with when the connection cannot carry it.
 */
static blk_status_t netblk_build_request(struct netblk_sock *nsock,
					 struct request *rq,
					 struct netblk_request *hdr)
{
	const struct netblk_params *p = &nsock->ns_params;
	bool fua = (rq->cmd_flags & REQ_FUA) &&
		   (p->np_export_flags & NETBLK_EXPORT_SEND_FUA);
	u64 offset = (u64)blk_rq_pos(rq) << SECTOR_SHIFT;
	u32 length = blk_rq_bytes(rq);
	u16 flags = 0;
	u16 opcode;

	switch (req_op(rq)) {
	case REQ_OP_READ:
		opcode = NETBLK_CMD_READ;
		if (length > p->np_max_payload)
			return BLK_STS_IOERR;
		break;
	case REQ_OP_WRITE:
		opcode = NETBLK_CMD_WRITE;
		if (length > p->np_max_payload)
			return BLK_STS_IOERR;
		if (fua)
			flags |= NETBLK_CMD_FLAG_FUA;
		break;
	case REQ_OP_FLUSH:
		opcode = NETBLK_CMD_FLUSH;
		offset = 0;
		length = 0;
		break;
	case REQ_OP_DISCARD:
		if (!(p->np_export_flags & NETBLK_EXPORT_SEND_TRIM))
			return BLK_STS_NOTSUPP;
		opcode = NETBLK_CMD_TRIM;
		break;
	case REQ_OP_WRITE_ZEROES:
		if (!(p->np_export_flags & NETBLK_EXPORT_SEND_WRITE_ZEROES))
			return BLK_STS_NOTSUPP;
		opcode = NETBLK_CMD_WRITE_ZEROES;
		if (rq->cmd_flags & REQ_NOUNMAP)
			flags |= NETBLK_CMD_FLAG_NO_HOLE;
		if (fua)
			flags |= NETBLK_CMD_FLAG_FUA;
		break;
	default:
		return BLK_STS_NOTSUPP;
	}

	hdr->magic = cpu_to_be32(NETBLK_REQUEST_MAGIC);
	hdr->flags = cpu_to_be16(flags);
	hdr->opcode = cpu_to_be16(opcode);
	hdr->offset = cpu_to_be64(offset);
	hdr->length = cpu_to_be32(length);
	hdr->reserved = 0;
	return BLK_STS_OK;
}

/* Drop @nq's open record's connection: the record is sent or lost. */
static void netblk_queue_forget(struct netblk_queue *nq)
{
	lockdep_assert_held(&nq->nq_lock);
	if (nq->nq_open)
		netblk_sock_put(nq->nq_open);
	nq->nq_open = NULL;
}

/*
 * The connection for the next request of @nq's batch: where the batch
 * left its record open, else netblk_conn_choose()'s.  Return: a reference,
 * or NULL when not CONNECTED.
 */
static struct netblk_sock *netblk_queue_get_sock(struct netblk_dev *dev,
						 struct netblk_queue *nq,
						 unsigned int hwq)
{
	lockdep_assert_held(&nq->nq_lock);
	if (nq->nq_open) {
		if (!netblk_sock_dead(nq->nq_open)) {
			netblk_sock_get(nq->nq_open);
			return nq->nq_open;
		}
		/* The set is being reset; its record goes with it. */
		netblk_queue_forget(nq);
	}
	return netblk_conn_choose(dev, hwq);
}

/* End @nq's batch: send the record it left open, if any. */
static void netblk_queue_end_batch(struct netblk_queue *nq)
{
	int err;

	lockdep_assert_held(&nq->nq_lock);
	if (!nq->nq_open)
		return;
	err = netblk_sock_push(nq->nq_open);
	if (err && err != -EPIPE)
		netblk_sock_fail(nq->nq_open, "send failed (error %d)", err);
	netblk_queue_forget(nq);
}

/* Note once per connection set that the server was asked or answered. */
static void netblk_note(bool *flag)
{
	if (!READ_ONCE(*flag))
		WRITE_ONCE(*flag, true);
}

/*
 * @rq was sent on a connection that died: requeue it to be sent again, if
 * its resend budget lasts and the device may wait.  Return: true if
 * requeued; false if the caller must fail it.
 */
static bool netblk_resend(struct netblk_dev *dev, struct request *rq)
{
	struct netblk_cmd *cmd = blk_mq_rq_to_pdu(rq);

	if (cmd->nc_resends >= NETBLK_MAX_RESENDS) {
		dev_err_ratelimited(disk_to_dev(dev->nd_disk),
				    "op %u at %llu+%u failed: its connection was lost %u times\n",
				    req_op(rq),
				    (u64)blk_rq_pos(rq) << SECTOR_SHIFT,
				    blk_rq_bytes(rq), cmd->nc_resends + 1);
		return false;
	}
	if (!netblk_conn_requeue(dev, rq))
		return false;
	cmd->nc_resends++;
	trace_netblk_rq_requeued(dev->nd_index, rq, netblk_handle(cmd, rq));
	return true;
}

/*
 * Send @rq on @nsock as part of @nq's batch and keep the batch's record
 * state.  Return: as queue_rq.
 */
static blk_status_t netblk_queue_send(struct netblk_dev *dev,
				      struct netblk_queue *nq,
				      struct netblk_sock *nsock,
				      struct request *rq, bool last)
{
	struct netblk_cmd *cmd = blk_mq_rq_to_pdu(rq);
	struct netblk_request hdr;
	blk_status_t sts;
	int sent = 0;
	int err;

	lockdep_assert_held(&nq->nq_lock);
	sts = netblk_build_request(nsock, rq, &hdr);
	if (sts)
		return sts;

	cmd->nc_cookie++;
	hdr.handle = cpu_to_be64(netblk_handle(cmd, rq));
	netblk_inflight_set(dev, cmd, nsock);
	err = netblk_sock_send_rq(nsock, rq, &hdr, !last, &sent);
	if (!err) {
		trace_netblk_rq_sent(dev->nd_index, rq, be64_to_cpu(hdr.handle));
		netblk_note(&dev->nd_asked);
		if (last) {
			/* This frame pushed the batch's record. */
			netblk_queue_forget(nq);
		} else if (!nq->nq_open) {
			netblk_sock_get(nsock);
			nq->nq_open = nsock;
		}
		return BLK_STS_OK;
	}

	netblk_inflight_clear(dev, cmd);
	if ((err == -ERESTARTSYS || err == -EINTR) && !sent) {
		/* A signal in the submitter; retry from a worker. */
		return BLK_STS_RESOURCE;
	}
	netblk_sock_fail(nsock, "send failed (error %d)", err);
	return netblk_resend(dev, rq) ? BLK_STS_OK : BLK_STS_IOERR;
}

static blk_status_t netblk_queue_rq(struct blk_mq_hw_ctx *hctx,
				    const struct blk_mq_queue_data *bd)
{
	struct netblk_queue *nq = hctx->driver_data;
	struct request *rq = bd->rq;
	struct netblk_cmd *cmd = blk_mq_rq_to_pdu(rq);
	struct netblk_dev *dev = cmd->nc_dev;
	struct netblk_sock *nsock;
	blk_status_t sts;

	/*
	 * Hold the command across the send so that a fast reply (or a reset)
	 * cannot complete it while its pages are still being sent.
	 */
	mutex_lock(&cmd->nc_lock);
	if (!(rq->rq_flags & RQF_DONTPREP)) {
		/* A new request, not one sent again: blk-mq clears the flag. */
		cmd->nc_resends = 0;
		rq->rq_flags |= RQF_DONTPREP;
	}
	cmd->nc_status = BLK_STS_OK;
	clear_bit(NETBLK_CMD_STUCK, &cmd->nc_flags);
	blk_mq_start_request(rq);

	mutex_lock(&nq->nq_lock);
	nsock = netblk_queue_get_sock(dev, nq, hctx->queue_num);
	if (nsock) {
		sts = netblk_queue_send(dev, nq, nsock, rq, bd->last);
		netblk_sock_put(nsock);
	} else {
		sts = netblk_conn_requeue(dev, rq) ? BLK_STS_OK : BLK_STS_IOERR;
	}
	/*
	 * A batch whose last request was not sent ends here; blk-mq calls
	 * commit_rqs only when a request failed or was refused.
	 */
	if (bd->last)
		netblk_queue_end_batch(nq);
	mutex_unlock(&nq->nq_lock);

	mutex_unlock(&cmd->nc_lock);
	if (sts && sts != BLK_STS_RESOURCE)
		atomic64_inc(&dev->nd_stats.st_errors);
	return sts;
}

/*
 * blk-mq promised more requests (bd->last false) and then stopped: send
 * the TLS record the earlier ones are waiting in.
 */
static void netblk_commit_rqs(struct blk_mq_hw_ctx *hctx)
{
	struct netblk_queue *nq = hctx->driver_data;

	mutex_lock(&nq->nq_lock);
	netblk_queue_end_batch(nq);
	mutex_unlock(&nq->nq_lock);
}

static int netblk_init_hctx(struct blk_mq_hw_ctx *hctx, void *data,
			    unsigned int hctx_idx)
{
	struct netblk_dev *dev = data;

	hctx->driver_data = &dev->nd_queues[hctx_idx];
	return 0;
}

static void netblk_fail_rq(struct netblk_dev *dev, struct request *rq,
			   blk_status_t sts)
{
	struct netblk_cmd *cmd = blk_mq_rq_to_pdu(rq);

	cmd->nc_status = sts;
	atomic64_inc(&dev->nd_stats.st_errors);
}

static enum blk_eh_timer_return netblk_timeout(struct request *rq)
{
	struct netblk_cmd *cmd = blk_mq_rq_to_pdu(rq);
	struct netblk_dev *dev = cmd->nc_dev;
	struct netblk_sock *nsock;
	bool requeued;

	if (!mutex_trylock(&cmd->nc_lock)) {
		/*
		 * A sender or the receiver holds the command.  That is normal
		 * for an instant; for a whole timeout period it means a
		 * socket is stuck, and failing any connection of the set
		 * resets them all, which frees the holder.
		 */
		if (test_and_set_bit(NETBLK_CMD_STUCK, &cmd->nc_flags)) {
			nsock = netblk_conn_choose(dev,
						   rq->mq_hctx->queue_num);
			if (nsock) {
				netblk_sock_fail(nsock, "request timed out");
				netblk_sock_put(nsock);
			}
		}
		return BLK_EH_RESET_TIMER;
	}

	if (!netblk_inflight_clear(dev, cmd)) {
		/* Being completed by the receive worker. */
		mutex_unlock(&cmd->nc_lock);
		return BLK_EH_DONE;
	}

	atomic64_inc(&dev->nd_stats.st_timeouts);
	trace_netblk_rq_timeout(dev->nd_index, rq, netblk_handle(cmd, rq));
	netblk_sock_fail(cmd->nc_nsock, "request timed out after %u ms",
			 jiffies_to_msecs(rq->timeout));
	requeued = netblk_resend(dev, rq);
	if (!requeued)
		netblk_fail_rq(dev, rq, BLK_STS_TIMEOUT);
	mutex_unlock(&cmd->nc_lock);

	if (!requeued)
		blk_mq_complete_request(rq);
	return BLK_EH_DONE;
}

static void netblk_complete_rq(struct request *rq)
{
	struct netblk_cmd *cmd = blk_mq_rq_to_pdu(rq);

	blk_mq_end_request(rq, cmd->nc_status);
}

static int netblk_init_request(struct blk_mq_tag_set *set, struct request *rq,
			       unsigned int hctx_idx, unsigned int numa_node)
{
	struct netblk_cmd *cmd = blk_mq_rq_to_pdu(rq);

	cmd->nc_dev = set->driver_data;
	mutex_init(&cmd->nc_lock);
	return 0;
}

static void netblk_exit_request(struct blk_mq_tag_set *set, struct request *rq,
				unsigned int hctx_idx)
{
	struct netblk_cmd *cmd = blk_mq_rq_to_pdu(rq);

	mutex_destroy(&cmd->nc_lock);
}

static const struct blk_mq_ops netblk_mq_ops = {
	.queue_rq	= netblk_queue_rq,
	.commit_rqs	= netblk_commit_rqs,
	.init_hctx	= netblk_init_hctx,
	.complete	= netblk_complete_rq,
	.timeout	= netblk_timeout,
	.init_request	= netblk_init_request,
	.exit_request	= netblk_exit_request,
};

static void netblk_account_reply(struct netblk_dev *dev, struct request *rq,
				 blk_status_t sts)
{
	struct netblk_stats *st = &dev->nd_stats;
	u32 bytes = blk_rq_bytes(rq);

	switch (req_op(rq)) {
	case REQ_OP_READ:
		atomic64_inc(&st->st_read_requests);
		if (!sts)
			atomic64_add(bytes, &st->st_read_bytes);
		break;
	case REQ_OP_WRITE:
		atomic64_inc(&st->st_write_requests);
		if (!sts)
			atomic64_add(bytes, &st->st_write_bytes);
		break;
	case REQ_OP_FLUSH:
		atomic64_inc(&st->st_flush_requests);
		break;
	case REQ_OP_DISCARD:
		atomic64_inc(&st->st_discard_requests);
		break;
	case REQ_OP_WRITE_ZEROES:
		atomic64_inc(&st->st_write_zeroes_requests);
		break;
	default:
		break;
	}
	if (sts)
		atomic64_inc(&st->st_errors);
}

static struct request *netblk_find_rq(struct netblk_dev *dev, u64 handle)
{
	u32 tag = lower_32_bits(handle);
	u16 hwq = blk_mq_unique_tag_to_hwq(tag);

	if (hwq >= dev->nd_tag_set.nr_hw_queues)
		return NULL;
	return blk_mq_tag_to_rq(dev->nd_tag_set.tags[hwq],
				blk_mq_unique_tag_to_tag(tag));
}

/**
 * netblk_blk_handle_reply() - complete the request a reply header names
 * @nsock: the connection the reply arrived on
 * @reply: the reply header, as received
 *
 * Called by the receive worker.  Receives a successful READ's data into
 * the request's pages, then completes the request.  On any protocol
 * violation or receive failure the connection is failed (and the request,
 * if it is still in flight, is requeued by the reset that follows).
 *
 * Context: process context; takes the command's lock.
 * Return: 0 on success; -EPROTO for a bad magic or a reply naming no
 * request in flight on @nsock; a negative errno from receiving the data.
 */
int netblk_blk_handle_reply(struct netblk_sock *nsock,
			    const struct netblk_reply *reply)
{
	struct netblk_dev *dev = nsock->ns_dev;
	struct request_queue *q = dev->nd_disk->queue;
	u64 handle = be64_to_cpu(reply->handle);
	u32 error = be32_to_cpu(reply->error);
	struct netblk_cmd *cmd;
	struct request *rq;
	blk_status_t sts;
	int err;

	if (be32_to_cpu(reply->magic) != NETBLK_REPLY_MAGIC) {
		netblk_sock_fail(nsock, "bad reply magic 0x%08x",
				 be32_to_cpu(reply->magic));
		return -EPROTO;
	}

	/* Pin the request pool; none is in flight if the queue is frozen. */
	if (!percpu_ref_tryget(&q->q_usage_counter)) {
		netblk_sock_fail(nsock, "reply 0x%llx with no request in flight",
				 handle);
		return -EPROTO;
	}

	rq = netblk_find_rq(dev, handle);
	if (!rq || !blk_mq_request_started(rq)) {
		netblk_sock_fail(nsock, "reply for unknown handle 0x%llx",
				 handle);
		err = -EPROTO;
		goto out_put_ref;
	}

	cmd = blk_mq_rq_to_pdu(rq);
	mutex_lock(&cmd->nc_lock);
	if (!test_bit(NETBLK_CMD_INFLIGHT, &cmd->nc_flags) ||
	    cmd->nc_nsock != nsock ||
	    cmd->nc_cookie != upper_32_bits(handle)) {
		mutex_unlock(&cmd->nc_lock);
		netblk_sock_fail(nsock, "reply for a request not in flight (handle 0x%llx)",
				 handle);
		err = -EPROTO;
		goto out_put_ref;
	}

	sts = netblk_error_to_status(error);
	if (!sts && req_op(rq) == REQ_OP_READ && blk_rq_bytes(rq)) {
		err = netblk_sock_recv_rq(nsock, rq);
		if (err) {
			/* Stays INFLIGHT: the reset requeues it. */
			mutex_unlock(&cmd->nc_lock);
			goto out_put_ref;
		}
	}
	if (sts)
		dev_warn_ratelimited(disk_to_dev(dev->nd_disk),
				     "server error %u on op %u at %llu+%u\n",
				     error, req_op(rq),
				     (u64)blk_rq_pos(rq) << SECTOR_SHIFT,
				     blk_rq_bytes(rq));

	netblk_account_reply(dev, rq, sts);
	trace_netblk_rq_done(dev->nd_index, rq, handle, error);
	netblk_note(&dev->nd_answered);
	cmd->nc_status = sts;
	netblk_inflight_clear(dev, cmd);
	mutex_unlock(&cmd->nc_lock);

	if (likely(!blk_should_fake_timeout(q)))
		blk_mq_complete_request(rq);
	err = 0;
out_put_ref:
	percpu_ref_put(&q->q_usage_counter);
	return err;
}

static bool netblk_reset_rq(struct request *rq, void *data)
{
	struct netblk_cmd *cmd = blk_mq_rq_to_pdu(rq);
	struct netblk_dev *dev = data;
	bool requeued;

	mutex_lock(&cmd->nc_lock);
	if (!netblk_inflight_clear(dev, cmd)) {
		mutex_unlock(&cmd->nc_lock);
		return true;
	}
	requeued = netblk_resend(dev, rq);
	if (!requeued)
		netblk_fail_rq(dev, rq, BLK_STS_IOERR);
	mutex_unlock(&cmd->nc_lock);

	if (!requeued)
		blk_mq_complete_request(rq);
	return true;
}

/**
 * netblk_blk_reset_inflight() - take back every request sent on a dead
 *	connection
 * @dev: the device; the caller has already detached and killed the socket
 *
 * Each INFLIGHT request is requeued when the device is reconnecting and
 * its resend budget lasts, and failed with BLK_STS_IOERR otherwise (see
 * netblk_resend()).
 *
 * Context: process context, may sleep.
 */
void netblk_blk_reset_inflight(struct netblk_dev *dev)
{
	blk_mq_tagset_busy_iter(&dev->nd_tag_set, netblk_reset_rq, dev);
}

/**
 * netblk_blk_apply() - make the disk match a fresh connection's export
 * @dev: the device
 * @p: what the server's HELLO reply said
 *
 * Sets the capacity (with a uevent when it changed), read-only, the
 * largest request and the optional operations the export offers.
 *
 * Context: process context, with nd_lock held.
 */
void netblk_blk_apply(struct netblk_dev *dev, const struct netblk_params *p)
{
	struct gendisk *disk = dev->nd_disk;
	struct request_queue *q = disk->queue;
	u32 flags = p->np_export_flags;
	bool flush = flags & NETBLK_EXPORT_SEND_FLUSH;

	lockdep_assert_held(&dev->nd_lock);

	blk_queue_max_hw_sectors(q, p->np_max_payload >> SECTOR_SHIFT);
	if (flags & NETBLK_EXPORT_SEND_TRIM) {
		q->limits.discard_granularity = NETBLK_BLOCK_SIZE;
		blk_queue_max_discard_sectors(q, NETBLK_MAX_RANGE_SECTORS);
	} else {
		blk_queue_max_discard_sectors(q, 0);
	}
	if (flags & NETBLK_EXPORT_SEND_WRITE_ZEROES)
		blk_queue_max_write_zeroes_sectors(q, NETBLK_MAX_RANGE_SECTORS);
	else
		blk_queue_max_write_zeroes_sectors(q, 0);
	blk_queue_write_cache(q, flush,
			      flush && (flags & NETBLK_EXPORT_SEND_FUA));
	set_disk_ro(disk, flags & NETBLK_EXPORT_READ_ONLY);

	if (get_capacity(disk) != p->np_export_size >> SECTOR_SHIFT) {
		set_bit(GD_NEED_PART_SCAN, &disk->state);
		/* No uevent comes for a change from 0: send one like nbd. */
		if (!set_capacity_and_notify(disk,
					     p->np_export_size >> SECTOR_SHIFT))
			kobject_uevent(&disk_to_dev(disk)->kobj, KOBJ_CHANGE);
	}
}

/**
 * netblk_blk_clear() - capacity 0, writable, after a disconnect
 * @dev: the device
 *
 * Context: process context.
 */
void netblk_blk_clear(struct netblk_dev *dev)
{
	set_capacity_and_notify(dev->nd_disk, 0);
	set_disk_ro(dev->nd_disk, false);
}

/**
 * netblk_blk_set_timeout() - set the blk-mq request timeout
 * @dev: the device
 * @timeout_ms: milliseconds
 */
void netblk_blk_set_timeout(struct netblk_dev *dev, u32 timeout_ms)
{
	blk_queue_rq_timeout(dev->nd_disk->queue,
			     msecs_to_jiffies(timeout_ms));
}

static void netblk_blk_destroy_queues(struct netblk_dev *dev)
{
	unsigned int i;

	for (i = 0; i < dev->nd_nr_conns; i++)
		mutex_destroy(&dev->nd_queues[i].nq_lock);
}

/**
 * netblk_blk_init() - allocate the tag set and the (not yet added) disk
 * @dev: the device; nd_index, nd_nr_conns and nd_conf are set
 *
 * Return: 0, or -ENOMEM (or another errno from blk-mq) on failure.
 */
int netblk_blk_init(struct netblk_dev *dev)
{
	struct blk_mq_tag_set *set = &dev->nd_tag_set;
	struct request_queue *q;
	struct gendisk *disk;
	unsigned int i;
	int err;

	for (i = 0; i < dev->nd_nr_conns; i++)
		mutex_init(&dev->nd_queues[i].nq_lock);

	set->ops = &netblk_mq_ops;
	set->nr_hw_queues = dev->nd_nr_conns;
	set->queue_depth = netblk_queue_depth;
	set->numa_node = NUMA_NO_NODE;
	set->cmd_size = sizeof(struct netblk_cmd);
	set->flags = BLK_MQ_F_SHOULD_MERGE | BLK_MQ_F_BLOCKING;
	set->driver_data = dev;
	set->timeout = msecs_to_jiffies(dev->nd_conf.cf_request_timeout_ms);

	err = blk_mq_alloc_tag_set(set);
	if (err)
		goto out_destroy_queues;

	disk = blk_mq_alloc_disk(set, dev);
	if (IS_ERR(disk)) {
		err = PTR_ERR(disk);
		goto out_free_tag_set;
	}
	disk->major = netblk_major;
	disk->first_minor = dev->nd_index * NETBLK_MINORS;
	disk->minors = NETBLK_MINORS;
	disk->fops = &netblk_fops;
	disk->private_data = dev;
	snprintf(disk->disk_name, DISK_NAME_LEN, "netblk%u", dev->nd_index);
	set_capacity(disk, 0);

	q = disk->queue;
	blk_queue_logical_block_size(q, NETBLK_BLOCK_SIZE);
	blk_queue_physical_block_size(q, NETBLK_BLOCK_SIZE);
	blk_queue_io_min(q, NETBLK_BLOCK_SIZE);
	blk_queue_max_hw_sectors(q, NETBLK_MAX_PAYLOAD >> SECTOR_SHIFT);
	blk_queue_max_segments(q, USHRT_MAX);
	blk_queue_max_segment_size(q, UINT_MAX);
	blk_queue_max_discard_sectors(q, 0);
	blk_queue_max_write_zeroes_sectors(q, 0);
	blk_queue_flag_set(QUEUE_FLAG_NONROT, q);
	blk_queue_flag_clear(QUEUE_FLAG_ADD_RANDOM, q);

	dev->nd_disk = disk;
	return 0;

out_free_tag_set:
	blk_mq_free_tag_set(set);
out_destroy_queues:
	netblk_blk_destroy_queues(dev);
	return err;
}

/**
 * netblk_blk_exit() - free what netblk_blk_init() allocated
 * @dev: the device; its disk was deleted or never added
 */
void netblk_blk_exit(struct netblk_dev *dev)
{
	put_disk(dev->nd_disk);
	blk_mq_free_tag_set(&dev->nd_tag_set);
	netblk_blk_destroy_queues(dev);
}

/**
 * netblk_blk_add() - make /dev/netblkN and its sysfs files appear
 * @dev: the device
 *
 * Return: 0, or the errno of device_add_disk().
 */
int netblk_blk_add(struct netblk_dev *dev)
{
	return device_add_disk(NULL, dev->nd_disk, netblk_attr_groups);
}

/**
 * netblk_blk_del() - remove /dev/netblkN; the connection is stopped
 * @dev: the device
 */
void netblk_blk_del(struct netblk_dev *dev)
{
	del_gendisk(dev->nd_disk);
}
