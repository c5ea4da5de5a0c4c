// SPDX-License-Identifier: GPL-2.0
/*
 * netblk: the connection state machine and the handshake upcall requests.
 *
 * A device talks to its server over a set of connections, one per blk-mq
 * hardware queue (module parameter "connections").  The set is made, used
 * and lost as a unit: every state below is the set's.
 *
 *   DISCONNECTED/ERROR --connect--> CONNECTING --TCP up--> HANDSHAKING
 *   HANDSHAKING --every DONE ok--> CONNECTED
 *   CONNECTED --any connection: socket error, bad frame, request
 *                timeout--> RECONNECTING
 *   RECONNECTING --(connect + handshake) ok--> CONNECTED
 *   RECONNECTING --dead_timeout_ms or reconnect_retries spent--> ERROR
 *   CONNECTING/HANDSHAKING --any failure--> ERROR
 *   any --disconnect--> DISCONNECTED
 *
 * An outage (RECONNECTING) ends only when a connection of a new set answers
 * a request: a reconnect whose set is lost again with requests sent and
 * none answered (a server that logs in and then breaks the protocol or
 * stays silent) continues the outage, its deadline and its attempt count.
 *
 * While RECONNECTING, requests taken back from the dead connection and new
 * ones wait on the blk-mq requeue list; they are kicked when the device is
 * CONNECTED again (and sent) or leaves for ERROR/DISCONNECTED (and fail).
 * Every decision "requeue or fail" and every state change is made under
 * nd_io_lock, so no request can be requeued after the last kick.
 *
 * A server that does not offer NETBLK_EXPORT_MULTI_CONN gets one
 * connection: the others are closed and every queue sends on the first.
 *
 * The server list: the first connect starts at its first entry and tries
 * each entry once before it gives up.  A lost connection moves on to the
 * next entry, and so does every failed attempt; the next entry is tried at
 * once, and the backoff applies after each whole round.  So an outage ends
 * on the first server that answers (an active storaged; a standby answers
 * a login UNAVAILABLE) and a single server is retried as it always was.
 *
 * Handshake requests: each connected socket is put on a global list with a
 * cookie and READY is multicast.  ACCEPT hands the oldest unaccepted one to
 * the helper as an fd; DONE names it by cookie and ends it.  The deadline
 * (handshake_timeout_ms) runs from READY, one for the whole set.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/blkdev.h>
#include <linux/ctype.h>
#include <linux/inet.h>
#include <linux/jiffies.h>
#include <linux/random.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>

#include "netblk.h"
#include "netblk_trace.h"

static LIST_HEAD(netblk_hs_pending);
static DEFINE_MUTEX(netblk_hs_lock);	/* protects netblk_hs_pending */
static atomic64_t netblk_hs_next_cookie;

/* Each connection of the device's set, or attempt at one; under nd_lock. */
#define netblk_for_each_sock(dev, i) \
	for ((i) = 0; (i) < (dev)->nd_nr_conns && (dev)->nd_socks[i]; (i)++)

#define NETBLK_STATE_NAME(name, word)	[NETBLK_##name] = #word,
static const char * const netblk_state_names[NETBLK_NR_STATES] = {
	NETBLK_SYSFS_STATES(NETBLK_STATE_NAME)
};

/**
 * netblk_conn_state_name() - the sysfs name of a state
 * @state: the state
 *
 * Return: a static string.
 */
const char *netblk_conn_state_name(enum netblk_state state)
{
	if (state >= NETBLK_NR_STATES)
		return "unknown";
	return netblk_state_names[state];
}

/**
 * netblk_conn_state() - the current state
 * @dev: the device
 *
 * Return: the state; it may change as soon as this returns.
 */
enum netblk_state netblk_conn_state(struct netblk_dev *dev)
{
	enum netblk_state state;

	spin_lock(&dev->nd_io_lock);
	state = dev->nd_state;
	spin_unlock(&dev->nd_io_lock);
	return state;
}

/**
 * netblk_conn_idle() - may the configuration change?
 * @dev: the device, with nd_lock held
 *
 * Return: true when disconnected or in error.
 */
bool netblk_conn_idle(const struct netblk_dev *dev)
{
	lockdep_assert_held(&dev->nd_lock);
	return dev->nd_state == NETBLK_DISCONNECTED ||
	       dev->nd_state == NETBLK_ERROR;
}

static void netblk_conn_set_state(struct netblk_dev *dev,
				  enum netblk_state state)
{
	lockdep_assert_held(&dev->nd_lock);
	spin_lock(&dev->nd_io_lock);
	dev->nd_state = state;
	spin_unlock(&dev->nd_io_lock);
}

/* Keep sysfs "last_error" one printable line. */
static void netblk_sanitize(char *s)
{
	for (; *s; s++)
		if (!isprint(*s))
			*s = '?';
}

static __printf(2, 3)
void netblk_conn_set_error(struct netblk_dev *dev, const char *fmt, ...)
{
	va_list args;

	lockdep_assert_held(&dev->nd_lock);
	va_start(args, fmt);
	vsnprintf(dev->nd_error, sizeof(dev->nd_error), fmt, args);
	va_end(args);
	netblk_sanitize(dev->nd_error);
}

/**
 * netblk_conn_choose() - the connection to start a dispatch batch on
 * @dev: the device
 * @hwq: the dispatching hardware queue's index
 *
 * The queue's own connection, unless it has NETBLK_SPILL_BYTES more READ
 * and WRITE payload in flight than the least loaded one, which then gets
 * the batch.  Large transfers are bound by their crypto, which the server
 * runs in parallel per connection, so one submitting thread (whose CPU maps
 * to one queue) spreads them over the set.  Small requests stay together,
 * where the server answers many with one receive and one send; their cost
 * is per request, which more connections do not divide.
 *
 * Return: the connection with a reference, or NULL when not CONNECTED.
 */
struct netblk_sock *netblk_conn_choose(struct netblk_dev *dev,
				       unsigned int hwq)
{
	struct netblk_sock *own, *best, *nsock;
	long own_bytes, best_bytes, bytes;
	unsigned int i;

	spin_lock(&dev->nd_io_lock);
	own = dev->nd_live[hwq];
	if (!own) {
		spin_unlock(&dev->nd_io_lock);
		return NULL;
	}
	best = own;
	own_bytes = atomic_long_read(&own->ns_inflight_bytes);
	best_bytes = own_bytes;
	for (i = 0; i < dev->nd_nr_conns; i++) {
		nsock = dev->nd_live[i];
		bytes = atomic_long_read(&nsock->ns_inflight_bytes);
		if (bytes < best_bytes) {
			best = nsock;
			best_bytes = bytes;
		}
	}
	if (own_bytes - best_bytes < NETBLK_SPILL_BYTES)
		best = own;
	netblk_sock_get(best);
	spin_unlock(&dev->nd_io_lock);
	return best;
}

/**
 * netblk_conn_requeue() - requeue a request that cannot be sent now, if
 *	it may wait
 * @dev: the device
 * @rq: a started request that is not INFLIGHT; its command is locked
 *
 * A request may wait while the device is reconnecting (or connected but
 * one of its connections just died, which becomes reconnecting).  With a
 * healthy live connection for its queue it is requeued and sent again at
 * once.
 *
 * Return: true if requeued; false if the caller must fail it.
 */
bool netblk_conn_requeue(struct netblk_dev *dev, struct request *rq)
{
	struct netblk_sock *live;
	bool requeued = true;

	spin_lock(&dev->nd_io_lock);
	live = dev->nd_live[rq->mq_hctx->queue_num];
	if (live && !netblk_sock_dead(live))
		blk_mq_requeue_request(rq, true);
	else if (dev->nd_state == NETBLK_CONNECTED ||
		 dev->nd_state == NETBLK_RECONNECTING)
		blk_mq_requeue_request(rq, false);
	else
		requeued = false;
	spin_unlock(&dev->nd_io_lock);
	return requeued;
}

/**
 * netblk_conn_count() - how many connections carry I/O (sysfs
 *	"connections")
 * @dev: the device
 *
 * Return: the number of distinct live connections; 0 unless CONNECTED.
 */
unsigned int netblk_conn_count(struct netblk_dev *dev)
{
	struct netblk_sock *first;
	unsigned int i, count = 0;

	/* The live set is all of them, or the first for every queue. */
	spin_lock(&dev->nd_io_lock);
	first = dev->nd_live[0];
	for (i = 0; first && i < dev->nd_nr_conns; i++)
		if (!i || dev->nd_live[i] != first)
			count++;
	spin_unlock(&dev->nd_io_lock);
	return count;
}

/**
 * netblk_conn_sock_failed() - a connection failed; handle it in process
 *	context
 * @dev: the device
 */
void netblk_conn_sock_failed(struct netblk_dev *dev)
{
	queue_work(dev->nd_ctl_wq, &dev->nd_err_work);
}

/* --- handshake requests ------------------------------------------------ */

/**
 * netblk_hs_init() - seed the cookie counter
 *
 * Cookies start at a random value so that they are not reused across
 * module loads.
 */
void netblk_hs_init(void)
{
	atomic64_set(&netblk_hs_next_cookie, get_random_u64());
}

static void netblk_hs_release(struct kref *ref)
{
	struct netblk_hs_req *req = container_of(ref, struct netblk_hs_req,
						 hr_ref);

	netblk_sock_put(req->hr_nsock);
	kfree(req);
}

/**
 * netblk_hs_put() - drop a reference to a handshake request
 * @req: the request
 */
void netblk_hs_put(struct netblk_hs_req *req)
{
	kref_put(&req->hr_ref, netblk_hs_release);
}

static struct netblk_hs_req *netblk_hs_find(u64 cookie)
{
	struct netblk_hs_req *req;

	lockdep_assert_held(&netblk_hs_lock);
	list_for_each_entry(req, &netblk_hs_pending, hr_list)
		if (req->hr_cookie == cookie)
			return req;
	return NULL;
}

/* The handshake request @nsock waits on, or NULL. */
static struct netblk_hs_req *
netblk_hs_find_sock(const struct netblk_sock *nsock)
{
	lockdep_assert_held(&netblk_hs_lock);
	return nsock->ns_hs_cookie ? netblk_hs_find(nsock->ns_hs_cookie) : NULL;
}

/**
 * netblk_hs_accept() - take the oldest handshake no helper has accepted
 *
 * Return: the request, marked accepted, with a reference for the caller;
 * NULL if none is pending.
 */
struct netblk_hs_req *netblk_hs_accept(void)
{
	struct netblk_hs_req *req, *found = NULL;

	mutex_lock(&netblk_hs_lock);
	list_for_each_entry(req, &netblk_hs_pending, hr_list) {
		if (!req->hr_accepted) {
			req->hr_accepted = true;
			kref_get(&req->hr_ref);
			found = req;
			trace_netblk_hs_accept(req->hr_dev->nd_index,
					       req->hr_cookie);
			break;
		}
	}
	mutex_unlock(&netblk_hs_lock);
	return found;
}

/**
 * netblk_hs_unaccept() - give a request back after a failed ACCEPT reply
 * @req: a request from netblk_hs_accept()
 */
void netblk_hs_unaccept(struct netblk_hs_req *req)
{
	mutex_lock(&netblk_hs_lock);
	req->hr_accepted = false;
	mutex_unlock(&netblk_hs_lock);
}

/**
 * netblk_hs_remaining_ms() - time left until the handshake deadline
 * @req: the request
 *
 * Return: milliseconds, at least 1.
 */
u32 netblk_hs_remaining_ms(const struct netblk_hs_req *req)
{
	long left = (long)(req->hr_deadline - jiffies);

	return left > 0 ? max(jiffies_to_msecs(left), 1U) : 1;
}

/* End the attempt's pending handshakes, if any: they are no longer wanted. */
static void netblk_hs_cancel(struct netblk_dev *dev)
{
	struct netblk_hs_req *req, *tmp;
	LIST_HEAD(cancelled);
	unsigned int i;

	lockdep_assert_held(&dev->nd_lock);
	if (!dev->nd_hs_pending)
		return;

	mutex_lock(&netblk_hs_lock);
	netblk_for_each_sock(dev, i) {
		req = netblk_hs_find_sock(dev->nd_socks[i]);
		if (req)
			list_move(&req->hr_list, &cancelled);
		dev->nd_socks[i]->ns_hs_cookie = 0;
	}
	mutex_unlock(&netblk_hs_lock);

	dev->nd_hs_pending = 0;
	cancel_delayed_work(&dev->nd_hs_timeout_work);
	list_for_each_entry_safe(req, tmp, &cancelled, hr_list) {
		list_del_init(&req->hr_list);
		netblk_hs_put(req);
	}
}

/* --- connection lifecycle ----------------------------------------------- */

/*
 * Take the connection set away from the device into @socks and shut every
 * connection down; its receive worker has returned when this does.
 * Return: how many there were.  The caller drops their references with
 * netblk_conn_put_socks() once nothing in flight names them.
 */
static unsigned int netblk_conn_take_socks(struct netblk_dev *dev,
					   struct netblk_sock **socks)
{
	unsigned int i, n;

	lockdep_assert_held(&dev->nd_lock);
	netblk_hs_cancel(dev);
	netblk_for_each_sock(dev, n) {
		socks[n] = dev->nd_socks[n];
		dev->nd_socks[n] = NULL;
		netblk_sock_kill(socks[n]);
	}
	for (i = 0; i < n; i++)
		flush_work(&socks[i]->ns_recv_work);
	return n;
}

static void netblk_conn_put_socks(struct netblk_sock **socks, unsigned int n)
{
	while (n--)
		netblk_sock_put(socks[n]);
}

/*
 * Drop the connection set and set @state.  Requests in flight on it are
 * requeued (RECONNECTING) or failed (any other state), and requests
 * already waiting are kicked so that they fail, unless still RECONNECTING.
 */
static void netblk_conn_reset(struct netblk_dev *dev, enum netblk_state state)
{
	struct netblk_sock *socks[NETBLK_MAX_CONNECTIONS];
	unsigned int n;

	lockdep_assert_held(&dev->nd_lock);

	spin_lock(&dev->nd_io_lock);
	memset(dev->nd_live, 0, sizeof(dev->nd_live));
	dev->nd_state = state;
	spin_unlock(&dev->nd_io_lock);
	if (state == NETBLK_ERROR)
		trace_netblk_error(dev->nd_index, dev->nd_error);

	n = netblk_conn_take_socks(dev, socks);
	netblk_blk_reset_inflight(dev);

	if (state != NETBLK_RECONNECTING) {
		cancel_delayed_work(&dev->nd_connect_work);
		cancel_delayed_work(&dev->nd_dead_work);
		blk_mq_kick_requeue_list(dev->nd_disk->queue);
	}
	netblk_conn_put_socks(socks, n);
}

/* netblk_conn_next_attempt(): the outage ended in ERROR. */
#define NETBLK_GAVE_UP	ULONG_MAX

/*
 * RECONNECTING: end the outage in ERROR, failing every waiting request,
 * with last_error saying which limit ran out and what went wrong last.
 */
static void netblk_conn_give_up(struct netblk_dev *dev)
{
	struct netblk_conf *cf = &dev->nd_conf;
	char last[NETBLK_ERROR_LEN];

	lockdep_assert_held(&dev->nd_lock);
	strscpy(last, dev->nd_error, sizeof(last));
	if (dev->nd_attempts >= cf->cf_reconnect_retries)
		netblk_conn_set_error(dev, "gave up after %u reconnect attempts (reconnect_retries); last: %s",
				      dev->nd_attempts, last);
	else
		netblk_conn_set_error(dev, "no working connection within dead_timeout_ms (%u ms), after %u reconnect attempts; last: %s",
				      cf->cf_dead_timeout_ms, dev->nd_attempts,
				      last);
	dev_err(disk_to_dev(dev->nd_disk), "%s; failing I/O\n",
		dev->nd_error);
	netblk_conn_reset(dev, NETBLK_ERROR);
}

/*
 * RECONNECTING: one more attempt of the outage is spent (a failed one, or
 * a reconnect that answered nothing); give up once reconnect_retries or
 * the outage's deadline ran out.
 * Return: the delay before the next attempt, none within a round of the
 * server list and the backoff after each whole round; or NETBLK_GAVE_UP.
 */
static unsigned long netblk_conn_next_attempt(struct netblk_dev *dev)
{
	struct netblk_conf *cf = &dev->nd_conf;
	unsigned long delay = 0;

	lockdep_assert_held(&dev->nd_lock);
	dev->nd_attempts++;
	if (dev->nd_attempts >= cf->cf_reconnect_retries ||
	    !time_before(jiffies, dev->nd_dead_deadline)) {
		netblk_conn_give_up(dev);
		return NETBLK_GAVE_UP;
	}
	if (!(dev->nd_attempts % cf->cf_nr_servers)) {
		delay = msecs_to_jiffies(dev->nd_backoff_ms);
		dev->nd_backoff_ms = min_t(unsigned int, dev->nd_backoff_ms * 2,
					   NETBLK_BACKOFF_MAX_MS);
	}
	return delay;
}

/*
 * A connection attempt failed: the whole set is dropped and the next server
 * of the list is up.  The first connect tries each server once, then gives
 * up; a reconnect goes round the list, with exponential backoff after each
 * round, until its retries or the dead-connection deadline run out.
 */
static __printf(2, 3)
void netblk_conn_attempt_failed(struct netblk_dev *dev, const char *fmt, ...)
{
	struct netblk_sock *socks[NETBLK_MAX_CONNECTIONS];
	struct netblk_conf *cf = &dev->nd_conf;
	char reason[NETBLK_ERROR_LEN];
	char server[NETBLK_SERVER_STRLEN];
	unsigned long delay;
	va_list args;

	lockdep_assert_held(&dev->nd_lock);

	va_start(args, fmt);
	vsnprintf(reason, sizeof(reason), fmt, args);
	va_end(args);
	netblk_conn_set_error(dev, "%s", reason);
	netblk_conn_format_server(cf, dev->nd_server, server, sizeof(server));

	netblk_conn_put_socks(socks, netblk_conn_take_socks(dev, socks));
	dev->nd_server = (dev->nd_server + 1) % cf->cf_nr_servers;

	if (dev->nd_state != NETBLK_RECONNECTING) {
		dev->nd_attempts++;
		if (dev->nd_attempts < cf->cf_nr_servers) {
			dev_warn(disk_to_dev(dev->nd_disk),
				 "connect to %s failed: %s; trying the next server\n",
				 server, dev->nd_error);
			netblk_conn_set_state(dev, NETBLK_CONNECTING);
			queue_delayed_work(dev->nd_ctl_wq, &dev->nd_connect_work,
					   0);
			return;
		}
		dev_warn(disk_to_dev(dev->nd_disk), "connect to %s failed: %s\n",
			 server, dev->nd_error);
		netblk_conn_reset(dev, NETBLK_ERROR);
		return;
	}

	delay = netblk_conn_next_attempt(dev);
	if (delay == NETBLK_GAVE_UP)
		return;
	dev_warn_ratelimited(disk_to_dev(dev->nd_disk),
			     "reconnect attempt %u to %s failed: %s; retrying in %u ms\n",
			     dev->nd_attempts, server, reason,
			     jiffies_to_msecs(delay));
	queue_delayed_work(dev->nd_ctl_wq, &dev->nd_connect_work, delay);
}

/**
 * netblk_conn_format_addr() - the IP literal of an address, without
 *	brackets or port
 * @ss: an AF_INET or AF_INET6 address
 * @buf: where to write
 * @len: its size, at least INET6_ADDRSTRLEN for the whole text
 */
void netblk_conn_format_addr(const struct sockaddr_storage *ss, char *buf,
			     size_t len)
{
	if (ss->ss_family == AF_INET6)
		snprintf(buf, len, "%pI6c",
			 &((const struct sockaddr_in6 *)ss)->sin6_addr);
	else
		snprintf(buf, len, "%pI4",
			 &((const struct sockaddr_in *)ss)->sin_addr);
}

/* The port entry @i of the server list connects to. */
static u16 netblk_conn_server_port(const struct netblk_conf *cf,
				   unsigned int i)
{
	return cf->cf_servers[i].sv_port ?: cf->cf_port;
}

/**
 * netblk_conn_format_server() - "ADDR:PORT" or "[ADDR]:PORT" of a server
 * @cf: the configuration
 * @i: index in its server list, below cf_nr_servers
 * @buf: where to write
 * @len: its size, at least NETBLK_SERVER_STRLEN for the whole text
 */
void netblk_conn_format_server(const struct netblk_conf *cf, unsigned int i,
			       char *buf, size_t len)
{
	const struct sockaddr_storage *ss = &cf->cf_servers[i].sv_addr;
	u16 port = netblk_conn_server_port(cf, i);

	if (ss->ss_family == AF_INET6)
		snprintf(buf, len, "[%pI6c]:%u",
			 &((const struct sockaddr_in6 *)ss)->sin6_addr, port);
	else
		snprintf(buf, len, "%pI4:%u",
			 &((const struct sockaddr_in *)ss)->sin_addr, port);
}

/**
 * netblk_conn_current_server() - the server connected to or being tried
 *	(sysfs "current_server")
 * @dev: the device
 * @buf: where to write its netblk_conn_format_server() text
 * @len: size of @buf
 *
 * Context: takes nd_lock.
 * Return: 0; -ENOTCONN, with @buf empty, while disconnected or in error.
 */
int netblk_conn_current_server(struct netblk_dev *dev, char *buf, size_t len)
{
	int err = 0;

	mutex_lock(&dev->nd_lock);
	if (netblk_conn_idle(dev)) {
		buf[0] = '\0';
		err = -ENOTCONN;
	} else {
		netblk_conn_format_server(&dev->nd_conf, dev->nd_server, buf,
					  len);
	}
	mutex_unlock(&dev->nd_lock);
	return err;
}

static struct netblk_hs_req *netblk_hs_alloc(struct netblk_dev *dev,
					     struct netblk_sock *nsock,
					     unsigned long deadline)
{
	struct netblk_hs_req *req;

	req = kzalloc(sizeof(*req), GFP_KERNEL);
	if (!req)
		return NULL;
	kref_init(&req->hr_ref);
	INIT_LIST_HEAD(&req->hr_list);
	do {
		req->hr_cookie = atomic64_inc_return(&netblk_hs_next_cookie);
	} while (!req->hr_cookie);
	req->hr_dev = dev;
	netblk_sock_get(nsock);
	req->hr_nsock = nsock;
	req->hr_deadline = deadline;
	/* tls-bridge checks the certificate of the server actually reached. */
	netblk_conn_format_addr(&dev->nd_conf.cf_servers[dev->nd_server].sv_addr,
				req->hr_peer, sizeof(req->hr_peer));
	req->hr_port = netblk_conn_server_port(&dev->nd_conf, dev->nd_server);
	strscpy(req->hr_export, dev->nd_conf.cf_export,
		sizeof(req->hr_export));
	return req;
}

/*
 * Every connection of the attempt is up: post one handshake per connection
 * for tls-bridge, all under one deadline.
 */
static void netblk_conn_hs_start(struct netblk_dev *dev)
{
	unsigned long timeout = msecs_to_jiffies(netblk_handshake_timeout_ms);
	unsigned long deadline = jiffies + timeout;
	struct netblk_hs_req *reqs[NETBLK_MAX_CONNECTIONS];
	unsigned int i, n = dev->nd_nr_conns;
	int err;

	lockdep_assert_held(&dev->nd_lock);

	if (!netblk_genl_has_listener()) {
		netblk_conn_attempt_failed(dev, "no tls-bridge is listening");
		return;
	}

	for (i = 0; i < n; i++) {
		reqs[i] = netblk_hs_alloc(dev, dev->nd_socks[i], deadline);
		if (!reqs[i]) {
			while (i--)
				netblk_hs_put(reqs[i]);
			netblk_conn_attempt_failed(dev, "out of memory");
			return;
		}
	}

	if (dev->nd_state == NETBLK_CONNECTING)
		netblk_conn_set_state(dev, NETBLK_HANDSHAKING);
	dev->nd_hs_pending = n;
	dev->nd_hs_deadline = deadline;
	mutex_lock(&netblk_hs_lock);
	for (i = 0; i < n; i++) {
		dev->nd_socks[i]->ns_hs_cookie = reqs[i]->hr_cookie;
		list_add_tail(&reqs[i]->hr_list, &netblk_hs_pending);
		trace_netblk_hs_request(dev->nd_index, reqs[i]->hr_cookie);
	}
	mutex_unlock(&netblk_hs_lock);
	mod_delayed_work(dev->nd_ctl_wq, &dev->nd_hs_timeout_work, timeout);

	/* One READY per request: each wakes a helper to ACCEPT one. */
	for (i = 0; i < n; i++) {
		err = netblk_genl_ready(dev->nd_index);
		if (err == -ESRCH) {
			netblk_conn_attempt_failed(dev, "no tls-bridge is listening");
			return;
		}
		if (err) {
			netblk_conn_attempt_failed(dev, "cannot post the handshake (error %d)",
						   err);
			return;
		}
	}
}

static const char *netblk_connect_errstr(int err)
{
	switch (err) {
	case -ECONNREFUSED:
		return "connection refused";
	case -ETIMEDOUT:
		return "timed out";
	case -ENETUNREACH:
		return "network is unreachable";
	case -EHOSTUNREACH:
		return "host is unreachable";
	case -ECONNRESET:
		return "connection reset";
	case -EADDRNOTAVAIL:
		return "address not available";
	case -EAFNOSUPPORT:
		return "address family not supported";
	default:
		return NULL;
	}
}

/*
 * Create the attempt's connections and publish them, so that a disconnect
 * can abort the connects.  Return: 0, or the errno of the socket that
 * could not be created (the ones made so far stay published).
 */
static int netblk_conn_create_socks(struct netblk_dev *dev, int family)
{
	struct netblk_sock *nsock;
	unsigned int i;

	lockdep_assert_held(&dev->nd_lock);
	for (i = 0; i < dev->nd_nr_conns; i++) {
		nsock = netblk_sock_create(dev, family);
		if (IS_ERR(nsock))
			return PTR_ERR(nsock);
		dev->nd_socks[i] = nsock;
	}
	return 0;
}

static void netblk_conn_connect_work(struct work_struct *work)
{
	struct netblk_dev *dev = container_of(to_delayed_work(work),
					      struct netblk_dev,
					      nd_connect_work);
	struct netblk_sock *socks[NETBLK_MAX_CONNECTIONS];
	char server[NETBLK_SERVER_STRLEN];
	struct sockaddr_storage addr;
	unsigned int i, n = dev->nd_nr_conns;
	unsigned int noio;
	const char *what;
	u16 port;
	int err;

	/* Reconnecting may be what writeback waits for: no I/O reclaim. */
	noio = memalloc_noio_save();
	mutex_lock(&dev->nd_lock);
	if ((dev->nd_state != NETBLK_CONNECTING &&
	     dev->nd_state != NETBLK_RECONNECTING) || dev->nd_socks[0])
		goto out_unlock;

	addr = dev->nd_conf.cf_servers[dev->nd_server].sv_addr;
	port = netblk_conn_server_port(&dev->nd_conf, dev->nd_server);
	if (addr.ss_family == AF_INET6)
		((struct sockaddr_in6 *)&addr)->sin6_port = htons(port);
	else
		((struct sockaddr_in *)&addr)->sin_port = htons(port);
	netblk_conn_format_server(&dev->nd_conf, dev->nd_server, server,
				  sizeof(server));
	trace_netblk_connect(dev->nd_index, server, dev->nd_attempts);

	err = netblk_conn_create_socks(dev, addr.ss_family);
	if (err) {
		netblk_conn_attempt_failed(dev, "socket: error %d", err);
		goto out_unlock;
	}
	for (i = 0; i < n; i++) {
		socks[i] = dev->nd_socks[i];
		netblk_sock_get(socks[i]);
	}
	mutex_unlock(&dev->nd_lock);

	for (i = 0, err = 0; i < n && !err; i++)
		err = netblk_sock_connect(socks[i], &addr,
					  netblk_connect_timeout_ms);

	mutex_lock(&dev->nd_lock);
	if (dev->nd_socks[0] != socks[0]) {
		/* Disconnected, or given up, meanwhile. */
	} else if (err) {
		what = netblk_connect_errstr(err);
		if (what)
			netblk_conn_attempt_failed(dev, "connect: %s", what);
		else
			netblk_conn_attempt_failed(dev, "connect: error %d",
						   err);
	} else {
		netblk_conn_hs_start(dev);
	}
	netblk_conn_put_socks(socks, n);

out_unlock:
	mutex_unlock(&dev->nd_lock);
	memalloc_noio_restore(noio);
}

static void netblk_conn_hs_timeout_work(struct work_struct *work)
{
	struct netblk_dev *dev = container_of(to_delayed_work(work),
					      struct netblk_dev,
					      nd_hs_timeout_work);
	struct netblk_hs_req *req;
	bool accepted = true;
	unsigned int i;

	mutex_lock(&dev->nd_lock);
	if (!dev->nd_hs_pending)
		goto out_unlock;
	if (time_before(jiffies, dev->nd_hs_deadline)) {
		mod_delayed_work(dev->nd_ctl_wq, &dev->nd_hs_timeout_work,
				 dev->nd_hs_deadline - jiffies);
		goto out_unlock;
	}

	mutex_lock(&netblk_hs_lock);
	netblk_for_each_sock(dev, i) {
		req = netblk_hs_find_sock(dev->nd_socks[i]);
		if (req && !req->hr_accepted)
			accepted = false;
	}
	mutex_unlock(&netblk_hs_lock);

	netblk_conn_attempt_failed(dev, accepted ?
				   "handshake timed out" :
				   "handshake timed out (no tls-bridge accepted it)");
out_unlock:
	mutex_unlock(&dev->nd_lock);
}

/* The first connection of the set that died, or NULL. */
static struct netblk_sock *netblk_conn_find_dead(struct netblk_dev *dev)
{
	unsigned int i;

	lockdep_assert_held(&dev->nd_lock);
	netblk_for_each_sock(dev, i)
		if (netblk_sock_dead(dev->nd_socks[i]))
			return dev->nd_socks[i];
	return NULL;
}

/* One connection of the set died: the set fails over as a unit. */
static void netblk_conn_err_work(struct work_struct *work)
{
	struct netblk_dev *dev = container_of(work, struct netblk_dev,
					      nd_err_work);
	struct netblk_conf *cf = &dev->nd_conf;
	char reason[NETBLK_REASON_LEN];
	struct netblk_sock *nsock;
	unsigned long delay = 0;
	bool fresh;

	mutex_lock(&dev->nd_lock);
	if (dev->nd_state != NETBLK_CONNECTED)
		goto out_unlock;
	nsock = netblk_conn_find_dead(dev);
	if (!nsock)
		goto out_unlock;

	netblk_sock_reason(nsock, reason, sizeof(reason));
	netblk_conn_set_error(dev, "connection lost: %s", reason);

	if (dev->nd_disconnecting) {
		netblk_conn_reset(dev, NETBLK_DISCONNECTED);
		goto out_unlock;
	}
	if (!cf->cf_reconnect_retries || !cf->cf_dead_timeout_ms) {
		dev_err(disk_to_dev(dev->nd_disk),
			"connection lost: %s; reconnecting is disabled\n",
			reason);
		netblk_conn_reset(dev, NETBLK_ERROR);
		goto out_unlock;
	}

	dev_warn(disk_to_dev(dev->nd_disk),
		 "connection lost: %s; reconnecting\n", reason);
	trace_netblk_reconnect(dev->nd_index, reason);
	atomic64_inc(&dev->nd_stats.st_reconnects);
	/* A set that was asked and answered nothing did not end the outage. */
	fresh = !dev->nd_outage || READ_ONCE(dev->nd_answered) ||
		!READ_ONCE(dev->nd_asked);
	netblk_conn_reset(dev, NETBLK_RECONNECTING);
	dev->nd_server = (dev->nd_server + 1) % cf->cf_nr_servers;
	if (fresh) {
		dev->nd_outage = true;
		dev->nd_attempts = 0;
		dev->nd_backoff_ms = NETBLK_BACKOFF_MIN_MS;
		dev->nd_dead_deadline = jiffies +
					msecs_to_jiffies(cf->cf_dead_timeout_ms);
	} else {
		delay = netblk_conn_next_attempt(dev);
		if (delay == NETBLK_GAVE_UP)
			goto out_unlock;
	}
	mod_delayed_work(dev->nd_ctl_wq, &dev->nd_dead_work,
			 dev->nd_dead_deadline - jiffies);
	mod_delayed_work(dev->nd_ctl_wq, &dev->nd_connect_work, delay);
out_unlock:
	mutex_unlock(&dev->nd_lock);
}

static void netblk_conn_dead_work(struct work_struct *work)
{
	struct netblk_dev *dev = container_of(to_delayed_work(work),
					      struct netblk_dev, nd_dead_work);

	mutex_lock(&dev->nd_lock);
	if (dev->nd_state != NETBLK_RECONNECTING)
		goto out_unlock;
	if (time_before(jiffies, dev->nd_dead_deadline)) {
		mod_delayed_work(dev->nd_ctl_wq, &dev->nd_dead_work,
				 dev->nd_dead_deadline - jiffies);
		goto out_unlock;
	}
	netblk_conn_give_up(dev);
out_unlock:
	mutex_unlock(&dev->nd_lock);
}

/*
 * Check what one connection's DONE says and keep it in the connection.
 * Return: 0; -EINVAL for unusable parameters, or the errno of
 * netblk_sock_check_ktls(), after failing the attempt.
 */
static int netblk_conn_take_params(struct netblk_dev *dev,
				   struct netblk_sock *nsock,
				   const struct netblk_params *p)
{
	int err;

	lockdep_assert_held(&dev->nd_lock);

	if (p->np_export_size % NETBLK_BLOCK_SIZE) {
		netblk_conn_attempt_failed(dev, "export size %llu is not a multiple of %u",
					   p->np_export_size,
					   NETBLK_BLOCK_SIZE);
		return -EINVAL;
	}
	if (p->np_export_size > NETBLK_MAX_EXPORT_SIZE) {
		netblk_conn_attempt_failed(dev, "export size %llu is beyond what the block layer addresses (%llu)",
					   p->np_export_size,
					   NETBLK_MAX_EXPORT_SIZE);
		return -EINVAL;
	}
	if (p->np_max_payload < NETBLK_BLOCK_SIZE ||
	    p->np_max_payload > NETBLK_MAX_PAYLOAD) {
		netblk_conn_attempt_failed(dev, "max payload %u is out of range",
					   p->np_max_payload);
		return -EINVAL;
	}
	if (!p->np_max_inflight) {
		netblk_conn_attempt_failed(dev, "server takes no requests (max inflight 0)");
		return -EINVAL;
	}
	err = netblk_sock_check_ktls(nsock);
	if (err) {
		netblk_conn_attempt_failed(dev, err == -ENOTCONN ?
					   "socket is not connected after the handshake" :
					   "kTLS is not active on the socket after the handshake");
		return err;
	}

	nsock->ns_params = *p;
	nsock->ns_params.np_max_payload = round_down(p->np_max_payload,
						     NETBLK_BLOCK_SIZE);
	return 0;
}

/*
 * Keep only the first connection when the server cannot keep several
 * coherent (no NETBLK_EXPORT_MULTI_CONN).  Return: how many remain.
 */
static unsigned int netblk_conn_trim_socks(struct netblk_dev *dev)
{
	unsigned int i, n = dev->nd_nr_conns;

	lockdep_assert_held(&dev->nd_lock);
	if (n == 1 ||
	    (dev->nd_socks[0]->ns_params.np_export_flags &
	     NETBLK_EXPORT_MULTI_CONN))
		return n;

	for (i = 1; i < n; i++) {
		netblk_sock_kill(dev->nd_socks[i]);
		netblk_sock_put(dev->nd_socks[i]);
		dev->nd_socks[i] = NULL;
	}
	dev_info(disk_to_dev(dev->nd_disk),
		 "export %s does not allow several connections; using one\n",
		 dev->nd_conf.cf_export);
	return 1;
}

/* Every DONE of the set said the handshake and login succeeded: start I/O. */
static int netblk_conn_established(struct netblk_dev *dev)
{
	const struct netblk_params *p = &dev->nd_socks[0]->ns_params;
	bool reconnect = dev->nd_state == NETBLK_RECONNECTING;
	char server[NETBLK_SERVER_STRLEN];
	const struct netblk_params *q;
	unsigned int i, n;

	lockdep_assert_held(&dev->nd_lock);

	for (i = 1; i < dev->nd_nr_conns; i++) {
		q = &dev->nd_socks[i]->ns_params;
		if (q->np_export_size != p->np_export_size ||
		    q->np_export_flags != p->np_export_flags ||
		    q->np_max_payload != p->np_max_payload) {
			netblk_conn_attempt_failed(dev, "connections disagree about export %s",
						   dev->nd_conf.cf_export);
			return -EPROTO;
		}
	}
	n = netblk_conn_trim_socks(dev);

	for (i = 0; i < n; i++)
		netblk_sock_start_recv(dev->nd_socks[i]);
	WRITE_ONCE(dev->nd_asked, false);
	WRITE_ONCE(dev->nd_answered, false);
	spin_lock(&dev->nd_io_lock);
	for (i = 0; i < dev->nd_nr_conns; i++)
		dev->nd_live[i] = dev->nd_socks[i % n];
	dev->nd_state = NETBLK_CONNECTED;
	spin_unlock(&dev->nd_io_lock);
	/* The outage's attempts and deadline stand until a request is answered. */
	cancel_delayed_work(&dev->nd_dead_work);
	if (dev->nd_last_server >= 0 && dev->nd_last_server != dev->nd_server)
		atomic64_inc(&dev->nd_stats.st_failovers);
	dev->nd_last_server = dev->nd_server;
	/* Live first: the capacity's uevent sends udev's probe at once. */
	netblk_blk_apply(dev, p);
	blk_mq_kick_requeue_list(dev->nd_disk->queue);

	netblk_conn_format_server(&dev->nd_conf, dev->nd_server, server,
				  sizeof(server));
	trace_netblk_established(dev->nd_index, server, n, p->np_export_size);
	dev_info(disk_to_dev(dev->nd_disk),
		 "%s %s export %s: %llu bytes, flags 0x%x, max payload %u, %u connection(s)\n",
		 reconnect ? "reconnected to" : "connected to", server,
		 dev->nd_conf.cf_export,
		 p->np_export_size, p->np_export_flags, p->np_max_payload, n);
	return 0;
}

/**
 * netblk_hs_done() - the helper finished a handshake (DONE)
 * @cookie: the attempt, from ACCEPT
 * @file: the file behind the helper's SOCKFD, or NULL if it sent none
 * @status: 0 on success, else a positive errno
 * @reason: on failure, the helper's words (may be NULL)
 * @p: on success, the export's parameters
 *
 * On failure the whole attempt fails with @reason as last_error.  On
 * success the connection is ready; when it is the last of its set to be,
 * the device is connected, unless the connections disagree about the
 * export.
 *
 * Context: process context (the DONE handler); takes nd_lock.
 * Return: 0 when the result was taken; -ENOENT for an unknown cookie (or
 * one whose attempt ended meanwhile); -EINVAL if the request was never
 * accepted, or on success with unusable parameters; -EBADF if @file is not
 * the request's socket; -ENOTCONN or -EPROTO if the socket is not
 * connected or has no kTLS; -EPROTO if the set disagrees about the export.
 */
int netblk_hs_done(u64 cookie, struct file *file, u32 status,
		   const char *reason, const struct netblk_params *p)
{
	struct netblk_hs_req *req;
	struct netblk_sock *nsock;
	struct netblk_dev *dev;
	int err = 0;

	mutex_lock(&netblk_hs_lock);
	req = netblk_hs_find(cookie);
	if (!req)
		err = -ENOENT;
	else if (!req->hr_accepted)
		err = -EINVAL;
	else if (file && file != req->hr_nsock->ns_file)
		err = -EBADF;
	else
		list_del_init(&req->hr_list);
	mutex_unlock(&netblk_hs_lock);
	if (err)
		return err;

	/* The list's reference is ours now. */
	dev = req->hr_dev;
	nsock = req->hr_nsock;
	mutex_lock(&dev->nd_lock);
	if (nsock->ns_hs_cookie != cookie) {
		err = -ENOENT;
		goto out_unlock;
	}
	nsock->ns_hs_cookie = 0;
	dev->nd_hs_pending--;
	trace_netblk_hs_done(dev->nd_index, cookie, status);

	if (status) {
		if (reason && reason[0])
			netblk_conn_attempt_failed(dev, "%s", reason);
		else
			netblk_conn_attempt_failed(dev, "handshake failed (error %u)",
						   status);
		goto out_unlock;
	}
	err = netblk_conn_take_params(dev, nsock, p);
	if (err || dev->nd_hs_pending)
		goto out_unlock;
	cancel_delayed_work(&dev->nd_hs_timeout_work);
	err = netblk_conn_established(dev);

out_unlock:
	mutex_unlock(&dev->nd_lock);
	netblk_hs_put(req);
	return err;
}

/**
 * netblk_conn_connect() - start connecting (sysfs "connect")
 * @dev: the device
 *
 * Asynchronous: "state" and "last_error" tell how it goes.
 *
 * Return: 0 when started; -EBUSY unless disconnected or in error;
 * -EDESTADDRREQ if no server (server_ip or servers) or no export is set;
 * -ENODEV while the module unloads.
 */
int netblk_conn_connect(struct netblk_dev *dev)
{
	int err = 0;

	mutex_lock(&dev->nd_ctl_lock);
	mutex_lock(&dev->nd_lock);
	if (dev->nd_dying) {
		err = -ENODEV;
	} else if (!netblk_conn_idle(dev)) {
		err = -EBUSY;
	} else if (!dev->nd_conf.cf_nr_servers || !dev->nd_conf.cf_export[0]) {
		err = -EDESTADDRREQ;
	} else {
		dev->nd_error[0] = '\0';
		dev->nd_server = 0;
		dev->nd_last_server = -1;
		dev->nd_attempts = 0;
		dev->nd_backoff_ms = NETBLK_BACKOFF_MIN_MS;
		dev->nd_outage = false;
		netblk_conn_set_state(dev, NETBLK_CONNECTING);
		mod_delayed_work(dev->nd_ctl_wq, &dev->nd_connect_work, 0);
	}
	mutex_unlock(&dev->nd_lock);
	mutex_unlock(&dev->nd_ctl_lock);
	return err;
}

/*
 * Send DISCONNECT on every healthy connection of the set, then give the
 * server NETBLK_DISCONNECT_WAIT_MS in all to flush and close them.
 */
static void netblk_conn_goodbye(struct netblk_dev *dev)
{
	unsigned long deadline = jiffies +
				 msecs_to_jiffies(NETBLK_DISCONNECT_WAIT_MS);
	bool sent[NETBLK_MAX_CONNECTIONS];
	unsigned int i, n;

	lockdep_assert_held(&dev->nd_lock);
	netblk_for_each_sock(dev, n)
		sent[n] = !netblk_sock_disconnect(dev->nd_socks[n]);
	for (i = 0; i < n; i++)
		if (sent[i])
			netblk_sock_wait_closed(dev->nd_socks[i], deadline);
}

/**
 * netblk_conn_disconnect() - disconnect, in any state (sysfs "disconnect")
 * @dev: the device
 *
 * When connected, new I/O is held back and the requests in flight get up
 * to their request timeout (at most NETBLK_DRAIN_MAX_MS) to complete; then
 * DISCONNECT is sent and the socket closed.  Whatever is still pending
 * fails with BLK_STS_IOERR.  Ends DISCONNECTED with capacity 0.
 *
 * Context: process context; may sleep for the drain.
 * Return: 0.
 */
int netblk_conn_disconnect(struct netblk_dev *dev)
{
	struct request_queue *q = dev->nd_disk->queue;
	unsigned long drain;
	bool graceful;

	mutex_lock(&dev->nd_ctl_lock);
	mutex_lock(&dev->nd_lock);
	graceful = dev->nd_state == NETBLK_CONNECTED;
	if (graceful)
		dev->nd_disconnecting = true;
	drain = msecs_to_jiffies(min(dev->nd_conf.cf_request_timeout_ms +
				     1000U, (u32)NETBLK_DRAIN_MAX_MS));
	mutex_unlock(&dev->nd_lock);

	if (graceful) {
		blk_freeze_queue_start(q);
		blk_mq_freeze_queue_wait_timeout(q, drain);
	}

	mutex_lock(&dev->nd_lock);
	if (graceful && dev->nd_state == NETBLK_CONNECTED)
		netblk_conn_goodbye(dev);
	if (!netblk_conn_idle(dev))
		dev_info(disk_to_dev(dev->nd_disk), "disconnected\n");
	netblk_conn_reset(dev, NETBLK_DISCONNECTED);
	dev->nd_disconnecting = false;
	netblk_blk_clear(dev);
	mutex_unlock(&dev->nd_lock);

	if (graceful)
		blk_mq_unfreeze_queue(q);
	mutex_unlock(&dev->nd_ctl_lock);
	return 0;
}

/**
 * netblk_conn_init() - initialise the connection side of a device
 * @dev: a zeroed device with nd_index set
 */
void netblk_conn_init(struct netblk_dev *dev)
{
	struct netblk_conf *cf = &dev->nd_conf;

	mutex_init(&dev->nd_ctl_lock);
	mutex_init(&dev->nd_lock);
	spin_lock_init(&dev->nd_io_lock);
	dev->nd_state = NETBLK_DISCONNECTED;
	dev->nd_backoff_ms = NETBLK_BACKOFF_MIN_MS;

	dev->nd_last_server = -1;
	cf->cf_port = NETBLK_DEFAULT_PORT;
	cf->cf_request_timeout_ms = NETBLK_REQUEST_TIMEOUT_MS_DEFAULT;
	cf->cf_dead_timeout_ms = NETBLK_DEAD_TIMEOUT_MS_DEFAULT;
	cf->cf_reconnect_retries = NETBLK_RECONNECT_RETRIES_DEFAULT;

	INIT_DELAYED_WORK(&dev->nd_connect_work, netblk_conn_connect_work);
	INIT_WORK(&dev->nd_err_work, netblk_conn_err_work);
	INIT_DELAYED_WORK(&dev->nd_hs_timeout_work,
			  netblk_conn_hs_timeout_work);
	INIT_DELAYED_WORK(&dev->nd_dead_work, netblk_conn_dead_work);
}

/**
 * netblk_conn_exit() - undo netblk_conn_init()
 * @dev: a stopped device
 */
void netblk_conn_exit(struct netblk_dev *dev)
{
	mutex_destroy(&dev->nd_lock);
	mutex_destroy(&dev->nd_ctl_lock);
}

/**
 * netblk_conn_stop() - disconnect for good: the module is unloading
 * @dev: the device
 *
 * Refuses further connects, disconnects, and waits for every work item.
 *
 * Context: process context; may sleep.
 */
void netblk_conn_stop(struct netblk_dev *dev)
{
	mutex_lock(&dev->nd_ctl_lock);
	mutex_lock(&dev->nd_lock);
	dev->nd_dying = true;
	mutex_unlock(&dev->nd_lock);
	mutex_unlock(&dev->nd_ctl_lock);

	netblk_conn_disconnect(dev);

	cancel_delayed_work_sync(&dev->nd_connect_work);
	cancel_work_sync(&dev->nd_err_work);
	cancel_delayed_work_sync(&dev->nd_hs_timeout_work);
	cancel_delayed_work_sync(&dev->nd_dead_work);
}
