/* SPDX-License-Identifier: GPL-2.0 */
/*
 * netblk trace events: the connection lifecycle (connect, the handshake
 * upcall, established, reconnect, error) and the data path (a request
 * sent, answered, timed out, requeued), in the style of nbd's and
 * net/handshake's.  kmod/README.md ("Tracing") shows how to read them.
 */
#undef TRACE_SYSTEM
#define TRACE_SYSTEM netblk

#if !defined(_NETBLK_TRACE_H) || defined(TRACE_HEADER_MULTI_READ)
#define _NETBLK_TRACE_H

#include <linux/blk-mq.h>
#include <linux/tracepoint.h>

TRACE_EVENT(netblk_connect,

	TP_PROTO(unsigned int dev, const char *server, unsigned int attempt),

	TP_ARGS(dev, server, attempt),

	TP_STRUCT__entry(
		__field(unsigned int, dev)
		__string(server, server)
		__field(unsigned int, attempt)
	),

	TP_fast_assign(
		__entry->dev = dev;
		__assign_str(server, server);
		__entry->attempt = attempt;
	),

	TP_printk("netblk%u: connecting to %s (attempt %u of the outage)",
		  __entry->dev, __get_str(server), __entry->attempt)
);

DECLARE_EVENT_CLASS(netblk_hs_class,

	TP_PROTO(unsigned int dev, u64 cookie),

	TP_ARGS(dev, cookie),

	TP_STRUCT__entry(
		__field(unsigned int, dev)
		__field(u64, cookie)
	),

	TP_fast_assign(
		__entry->dev = dev;
		__entry->cookie = cookie;
	),

	TP_printk("netblk%u: handshake cookie %llu", __entry->dev,
		  __entry->cookie)
);

/* READY was posted for one connection of the set. */
DEFINE_EVENT(netblk_hs_class, netblk_hs_request,
	TP_PROTO(unsigned int dev, u64 cookie),
	TP_ARGS(dev, cookie)
);

/* A helper's ACCEPT took it. */
DEFINE_EVENT(netblk_hs_class, netblk_hs_accept,
	TP_PROTO(unsigned int dev, u64 cookie),
	TP_ARGS(dev, cookie)
);

/* The helper's DONE: 0, or the errno it failed with. */
TRACE_EVENT(netblk_hs_done,

	TP_PROTO(unsigned int dev, u64 cookie, u32 status),

	TP_ARGS(dev, cookie, status),

	TP_STRUCT__entry(
		__field(unsigned int, dev)
		__field(u64, cookie)
		__field(u32, status)
	),

	TP_fast_assign(
		__entry->dev = dev;
		__entry->cookie = cookie;
		__entry->status = status;
	),

	TP_printk("netblk%u: handshake cookie %llu done, status %u",
		  __entry->dev, __entry->cookie, __entry->status)
);

TRACE_EVENT(netblk_established,

	TP_PROTO(unsigned int dev, const char *server, unsigned int conns,
		 u64 size),

	TP_ARGS(dev, server, conns, size),

	TP_STRUCT__entry(
		__field(unsigned int, dev)
		__string(server, server)
		__field(unsigned int, conns)
		__field(u64, size)
	),

	TP_fast_assign(
		__entry->dev = dev;
		__assign_str(server, server);
		__entry->conns = conns;
		__entry->size = size;
	),

	TP_printk("netblk%u: connected to %s, %u connection(s), %llu bytes",
		  __entry->dev, __get_str(server), __entry->conns,
		  __entry->size)
);

DECLARE_EVENT_CLASS(netblk_reason_class,

	TP_PROTO(unsigned int dev, const char *reason),

	TP_ARGS(dev, reason),

	TP_STRUCT__entry(
		__field(unsigned int, dev)
		__string(reason, reason)
	),

	TP_fast_assign(
		__entry->dev = dev;
		__assign_str(reason, reason);
	),

	TP_printk("netblk%u: %s", __entry->dev, __get_str(reason))
);

/* The set was lost and the device reconnects (the reason: why). */
DEFINE_EVENT(netblk_reason_class, netblk_reconnect,
	TP_PROTO(unsigned int dev, const char *reason),
	TP_ARGS(dev, reason)
);

/* The device went to error (the reason: last_error). */
DEFINE_EVENT(netblk_reason_class, netblk_error,
	TP_PROTO(unsigned int dev, const char *reason),
	TP_ARGS(dev, reason)
);

DECLARE_EVENT_CLASS(netblk_rq_class,

	TP_PROTO(unsigned int dev, struct request *rq, u64 handle),

	TP_ARGS(dev, rq, handle),

	TP_STRUCT__entry(
		__field(unsigned int, dev)
		__field(u64, handle)
		__field(unsigned int, op)
		__field(u64, offset)
		__field(unsigned int, bytes)
	),

	TP_fast_assign(
		__entry->dev = dev;
		__entry->handle = handle;
		__entry->op = (__force unsigned int)req_op(rq);
		__entry->offset = (u64)blk_rq_pos(rq) << SECTOR_SHIFT;
		__entry->bytes = blk_rq_bytes(rq);
	),

	TP_printk("netblk%u: handle 0x%016llx op %u at %llu+%u",
		  __entry->dev, __entry->handle, __entry->op,
		  __entry->offset, __entry->bytes)
);

/* The request's frame (a WRITE's data too) went to the socket. */
DEFINE_EVENT(netblk_rq_class, netblk_rq_sent,
	TP_PROTO(unsigned int dev, struct request *rq, u64 handle),
	TP_ARGS(dev, rq, handle)
);

/* It was in flight for request_timeout_ms. */
DEFINE_EVENT(netblk_rq_class, netblk_rq_timeout,
	TP_PROTO(unsigned int dev, struct request *rq, u64 handle),
	TP_ARGS(dev, rq, handle)
);

/* Its connection died and it waits to be sent again. */
DEFINE_EVENT(netblk_rq_class, netblk_rq_requeued,
	TP_PROTO(unsigned int dev, struct request *rq, u64 handle),
	TP_ARGS(dev, rq, handle)
);

/* Its reply arrived: the server's NETBLK_E* error, 0 for success. */
TRACE_EVENT(netblk_rq_done,

	TP_PROTO(unsigned int dev, struct request *rq, u64 handle, u32 error),

	TP_ARGS(dev, rq, handle, error),

	TP_STRUCT__entry(
		__field(unsigned int, dev)
		__field(u64, handle)
		__field(unsigned int, op)
		__field(u32, error)
	),

	TP_fast_assign(
		__entry->dev = dev;
		__entry->handle = handle;
		__entry->op = (__force unsigned int)req_op(rq);
		__entry->error = error;
	),

	TP_printk("netblk%u: handle 0x%016llx op %u done, error %u",
		  __entry->dev, __entry->handle, __entry->op, __entry->error)
);

#endif /* _NETBLK_TRACE_H */

/* An out-of-tree module: define_trace.h finds this file by these. */
#undef TRACE_INCLUDE_PATH
#define TRACE_INCLUDE_PATH .
#undef TRACE_INCLUDE_FILE
#define TRACE_INCLUDE_FILE netblk_trace
#include <trace/define_trace.h>
