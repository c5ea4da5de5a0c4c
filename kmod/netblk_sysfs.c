// SPDX-License-Identifier: GPL-2.0
/*
 * netblk: control files under /sys/block/netblkN/.
 *
 *   servers, server_ip, server_port, export
 *                                      where to connect (rw; -EBUSY unless
 *                                      disconnected or in error)
 *   request_timeout_ms, dead_timeout_ms, reconnect_retries
 *                                      failure handling (rw, any time)
 *   connect, disconnect                write "1" (wo)
 *   state, last_error, stats, connections, current_server
 *                                      what is going on (ro)
 *
 * Every store parses the whole value (one trailing newline allowed) and
 * returns -EINVAL without changing anything when it is not valid.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/blkdev.h>
#include <linux/ctype.h>
#include <linux/device.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/inet.h>
#include <linux/kernel.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include <net/ipv6.h>

#include "netblk.h"

static struct netblk_dev *netblk_from_device(struct device *d)
{
	return dev_to_disk(d)->private_data;
}

/* The value without one trailing newline; 0 if it is empty or too long. */
static size_t netblk_value_len(const char *buf, size_t count, size_t max)
{
	if (count && buf[count - 1] == '\n')
		count--;
	if (!count || count > max)
		return 0;
	return count;
}

/* --- servers, server_ip --------------------------------------------------- */

/* An IPv4 or IPv6 literal, all of @buf[0..len). */
static int netblk_parse_ip(const char *buf, size_t len,
			   struct sockaddr_storage *ss)
{
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
	struct sockaddr_in *sin = (struct sockaddr_in *)ss;
	const char *end;

	if (!len || len >= INET6_ADDRSTRLEN)
		return -EINVAL;
	memset(ss, 0, sizeof(*ss));
	if (in4_pton(buf, len, (u8 *)&sin->sin_addr.s_addr, -1, &end) &&
	    end == buf + len) {
		sin->sin_family = AF_INET;
		return 0;
	}
	if (in6_pton(buf, len, sin6->sin6_addr.s6_addr, -1, &end) &&
	    end == buf + len) {
		sin6->sin6_family = AF_INET6;
		return 0;
	}
	return -EINVAL;
}

/* A port 1-65535 in decimal, all of @buf[0..len). */
static int netblk_parse_port(const char *buf, size_t len, u16 *port)
{
	char digits[6];

	if (!len || len >= sizeof(digits))
		return -EINVAL;
	memcpy(digits, buf, len);
	digits[len] = '\0';
	if (kstrtou16(digits, 10, port) || !*port || !isdigit(digits[0]))
		return -EINVAL;
	return 0;
}

/*
 * One server list entry, all of @buf[0..len): ADDR4, ADDR4:PORT, ADDR6,
 * [ADDR6] or [ADDR6]:PORT.  Without a port the entry uses server_port's.
 */
static int netblk_parse_server(const char *buf, size_t len,
			       struct netblk_server *sv)
{
	const char *colon, *close;

	sv->sv_port = 0;
	if (len && buf[0] == '[') {
		close = memchr(buf, ']', len);
		if (!close || netblk_parse_ip(buf + 1, close - buf - 1,
					      &sv->sv_addr) ||
		    sv->sv_addr.ss_family != AF_INET6)
			return -EINVAL;
		if (close == buf + len - 1)
			return 0;
		if (close[1] != ':')
			return -EINVAL;
		return netblk_parse_port(close + 2, buf + len - close - 2,
					 &sv->sv_port);
	}
	colon = memchr(buf, ':', len);
	if (colon && !memchr(colon + 1, ':', buf + len - colon - 1)) {
		/* one colon: ADDR4:PORT */
		if (netblk_parse_ip(buf, colon - buf, &sv->sv_addr) ||
		    sv->sv_addr.ss_family != AF_INET)
			return -EINVAL;
		return netblk_parse_port(colon + 1, buf + len - colon - 1,
					 &sv->sv_port);
	}
	return netblk_parse_ip(buf, len, &sv->sv_addr);
}

static bool netblk_same_server(const struct netblk_server *a,
			       const struct netblk_server *b)
{
	if (a->sv_port != b->sv_port ||
	    a->sv_addr.ss_family != b->sv_addr.ss_family)
		return false;
	if (a->sv_addr.ss_family == AF_INET6)
		return ipv6_addr_equal(
			&((const struct sockaddr_in6 *)&a->sv_addr)->sin6_addr,
			&((const struct sockaddr_in6 *)&b->sv_addr)->sin6_addr);
	return ((const struct sockaddr_in *)&a->sv_addr)->sin_addr.s_addr ==
	       ((const struct sockaddr_in *)&b->sv_addr)->sin_addr.s_addr;
}

/* Entries separated by spaces or commas; 1-NETBLK_MAX_SERVERS, distinct. */
static int netblk_parse_servers(const char *buf, size_t count,
				struct netblk_server *servers,
				unsigned int *nr)
{
	size_t len = netblk_value_len(buf, count, PAGE_SIZE);
	const char *end = buf + len, *p = buf, *q;
	unsigned int i;

	*nr = 0;
	while (p < end) {
		if (*p == ' ' || *p == ',') {
			p++;
			continue;
		}
		for (q = p; q < end && *q != ' ' && *q != ','; q++)
			;
		if (*nr == NETBLK_MAX_SERVERS ||
		    netblk_parse_server(p, q - p, &servers[*nr]))
			return -EINVAL;
		for (i = 0; i < *nr; i++)
			if (netblk_same_server(&servers[i], &servers[*nr]))
				return -EINVAL;
		(*nr)++;
		p = q;
	}
	return *nr ? 0 : -EINVAL;
}

/* Replace the server list, unless a connection is in use; nd_lock taken. */
static ssize_t netblk_set_servers(struct netblk_dev *dev,
				  const struct netblk_server *servers,
				  unsigned int nr, size_t count)
{
	ssize_t ret = count;

	mutex_lock(&dev->nd_lock);
	if (netblk_conn_idle(dev)) {
		memcpy(dev->nd_conf.cf_servers, servers, nr * sizeof(*servers));
		dev->nd_conf.cf_nr_servers = nr;
	} else {
		ret = -EBUSY;
	}
	mutex_unlock(&dev->nd_lock);
	return ret;
}

static ssize_t servers_show(struct device *d, struct device_attribute *attr,
			    char *buf)
{
	struct netblk_dev *dev = netblk_from_device(d);
	struct netblk_conf *cf = &dev->nd_conf;
	char server[NETBLK_SERVER_STRLEN];
	const struct netblk_server *sv;
	ssize_t len = 0;
	unsigned int i;

	mutex_lock(&dev->nd_lock);
	for (i = 0; i < cf->cf_nr_servers; i++) {
		sv = &cf->cf_servers[i];
		if (sv->sv_port)
			netblk_conn_format_server(cf, i, server, sizeof(server));
		else
			netblk_conn_format_addr(&sv->sv_addr, server,
						sizeof(server));
		len += sysfs_emit_at(buf, len, "%s%s", i ? " " : "", server);
	}
	len += sysfs_emit_at(buf, len, "\n");
	mutex_unlock(&dev->nd_lock);
	return len;
}

static ssize_t servers_store(struct device *d, struct device_attribute *attr,
			     const char *buf, size_t count)
{
	struct netblk_server servers[NETBLK_MAX_SERVERS];
	unsigned int nr;

	if (netblk_parse_servers(buf, count, servers, &nr))
		return -EINVAL;
	return netblk_set_servers(netblk_from_device(d), servers, nr, count);
}
static DEVICE_ATTR_RW(servers);

/* server_ip: the first server's address; a write makes it the only one. */
static ssize_t server_ip_show(struct device *d, struct device_attribute *attr,
			      char *buf)
{
	struct netblk_dev *dev = netblk_from_device(d);
	char addr[INET6_ADDRSTRLEN] = "";

	mutex_lock(&dev->nd_lock);
	if (dev->nd_conf.cf_nr_servers)
		netblk_conn_format_addr(&dev->nd_conf.cf_servers[0].sv_addr,
					addr, sizeof(addr));
	mutex_unlock(&dev->nd_lock);
	return sysfs_emit(buf, "%s\n", addr);
}

static ssize_t server_ip_store(struct device *d, struct device_attribute *attr,
			       const char *buf, size_t count)
{
	size_t len = netblk_value_len(buf, count, INET6_ADDRSTRLEN - 1);
	struct netblk_server server = { .sv_port = 0 };

	if (netblk_parse_ip(buf, len, &server.sv_addr))
		return -EINVAL;
	return netblk_set_servers(netblk_from_device(d), &server, 1, count);
}
static DEVICE_ATTR_RW(server_ip);

/* --- server_port -------------------------------------------------------- */

static ssize_t server_port_show(struct device *d,
				struct device_attribute *attr, char *buf)
{
	struct netblk_dev *dev = netblk_from_device(d);
	ssize_t ret;

	mutex_lock(&dev->nd_lock);
	ret = sysfs_emit(buf, "%u\n", dev->nd_conf.cf_port);
	mutex_unlock(&dev->nd_lock);
	return ret;
}

static ssize_t server_port_store(struct device *d,
				 struct device_attribute *attr,
				 const char *buf, size_t count)
{
	struct netblk_dev *dev = netblk_from_device(d);
	ssize_t ret = count;
	u16 port;

	if (kstrtou16(buf, 10, &port) || !port)
		return -EINVAL;

	mutex_lock(&dev->nd_lock);
	if (netblk_conn_idle(dev))
		dev->nd_conf.cf_port = port;
	else
		ret = -EBUSY;
	mutex_unlock(&dev->nd_lock);
	return ret;
}
static DEVICE_ATTR_RW(server_port);

/* --- export ------------------------------------------------------------- */

/* docs/protocol.md: 1..64 of [A-Za-z0-9._-], not starting with . or - */
static bool netblk_valid_export(const char *name, size_t len)
{
	size_t i;

	if (!len || len > NETBLK_MAX_EXPORT_NAME)
		return false;
	if (name[0] == '.' || name[0] == '-')
		return false;
	for (i = 0; i < len; i++)
		if (!isalnum(name[i]) && name[i] != '.' && name[i] != '_' &&
		    name[i] != '-')
			return false;
	return true;
}

static ssize_t export_show(struct device *d, struct device_attribute *attr,
			   char *buf)
{
	struct netblk_dev *dev = netblk_from_device(d);
	ssize_t ret;

	mutex_lock(&dev->nd_lock);
	ret = sysfs_emit(buf, "%s\n", dev->nd_conf.cf_export);
	mutex_unlock(&dev->nd_lock);
	return ret;
}

static ssize_t export_store(struct device *d, struct device_attribute *attr,
			    const char *buf, size_t count)
{
	struct netblk_dev *dev = netblk_from_device(d);
	size_t len = netblk_value_len(buf, count, NETBLK_MAX_EXPORT_NAME);
	ssize_t ret = count;

	if (!netblk_valid_export(buf, len))
		return -EINVAL;

	mutex_lock(&dev->nd_lock);
	if (netblk_conn_idle(dev)) {
		memcpy(dev->nd_conf.cf_export, buf, len);
		dev->nd_conf.cf_export[len] = '\0';
	} else {
		ret = -EBUSY;
	}
	mutex_unlock(&dev->nd_lock);
	return ret;
}
static DEVICE_ATTR_RW(export);

/* --- numeric knobs ------------------------------------------------------ */

static ssize_t netblk_u32_show(struct device *d, char *buf, size_t offset)
{
	struct netblk_dev *dev = netblk_from_device(d);
	ssize_t ret;

	mutex_lock(&dev->nd_lock);
	ret = sysfs_emit(buf, "%u\n",
			 *(u32 *)((char *)&dev->nd_conf + offset));
	mutex_unlock(&dev->nd_lock);
	return ret;
}

static ssize_t netblk_u32_store(struct device *d, const char *buf,
				size_t count, size_t offset, u32 min, u32 max,
				void (*apply)(struct netblk_dev *dev, u32 val))
{
	struct netblk_dev *dev = netblk_from_device(d);
	u32 val;

	if (kstrtou32(buf, 10, &val) || val < min || val > max)
		return -EINVAL;

	mutex_lock(&dev->nd_lock);
	*(u32 *)((char *)&dev->nd_conf + offset) = val;
	if (apply)
		apply(dev, val);
	mutex_unlock(&dev->nd_lock);
	return count;
}

/* One line declares a u32 knob of struct netblk_conf, its range and hook. */
#define NETBLK_U32_ATTR(_name, _min, _max, _apply)			\
static ssize_t _name##_show(struct device *d,				\
			    struct device_attribute *attr, char *buf)	\
{									\
	return netblk_u32_show(d, buf,					\
			       offsetof(struct netblk_conf, cf_##_name)); \
}									\
static ssize_t _name##_store(struct device *d,				\
			     struct device_attribute *attr,		\
			     const char *buf, size_t count)		\
{									\
	return netblk_u32_store(d, buf, count,				\
				offsetof(struct netblk_conf, cf_##_name), \
				_min, _max, _apply);			\
}									\
static DEVICE_ATTR_RW(_name)

NETBLK_U32_ATTR(request_timeout_ms, NETBLK_REQUEST_TIMEOUT_MS_MIN,
		NETBLK_REQUEST_TIMEOUT_MS_MAX, netblk_blk_set_timeout);
NETBLK_U32_ATTR(dead_timeout_ms, NETBLK_DEAD_TIMEOUT_MS_MIN,
		NETBLK_DEAD_TIMEOUT_MS_MAX, NULL);
NETBLK_U32_ATTR(reconnect_retries, NETBLK_RECONNECT_RETRIES_MIN,
		NETBLK_RECONNECT_RETRIES_MAX, NULL);

/* --- connect, disconnect ------------------------------------------------ */

static ssize_t connect_store(struct device *d, struct device_attribute *attr,
			     const char *buf, size_t count)
{
	int err;

	if (!sysfs_streq(buf, "1"))
		return -EINVAL;
	err = netblk_conn_connect(netblk_from_device(d));
	return err ? err : count;
}
static DEVICE_ATTR_WO(connect);

static ssize_t disconnect_store(struct device *d,
				struct device_attribute *attr,
				const char *buf, size_t count)
{
	int err;

	if (!sysfs_streq(buf, "1"))
		return -EINVAL;
	err = netblk_conn_disconnect(netblk_from_device(d));
	return err ? err : count;
}
static DEVICE_ATTR_WO(disconnect);

/* --- state, last_error, stats, connections ------------------------------ */

static ssize_t state_show(struct device *d, struct device_attribute *attr,
			  char *buf)
{
	struct netblk_dev *dev = netblk_from_device(d);

	return sysfs_emit(buf, "%s\n",
			  netblk_conn_state_name(netblk_conn_state(dev)));
}
static DEVICE_ATTR_RO(state);

static ssize_t last_error_show(struct device *d,
			       struct device_attribute *attr, char *buf)
{
	struct netblk_dev *dev = netblk_from_device(d);
	ssize_t ret;

	mutex_lock(&dev->nd_lock);
	ret = sysfs_emit(buf, "%s\n", dev->nd_error);
	mutex_unlock(&dev->nd_lock);
	return ret;
}
static DEVICE_ATTR_RO(last_error);

static ssize_t stats_show(struct device *d, struct device_attribute *attr,
			  char *buf)
{
	struct netblk_stats *st = &netblk_from_device(d)->nd_stats;
	int len = 0;

#define NETBLK_STATS_LINE(key)						\
	len += sysfs_emit_at(buf, len, #key ": %lld\n",			\
			     (long long)atomic64_read(&st->st_##key));
	NETBLK_SYSFS_STATS(NETBLK_STATS_LINE)
#undef NETBLK_STATS_LINE
	return len;
}
static DEVICE_ATTR_RO(stats);

static ssize_t current_server_show(struct device *d,
				   struct device_attribute *attr, char *buf)
{
	char server[NETBLK_SERVER_STRLEN];

	netblk_conn_current_server(netblk_from_device(d), server,
				   sizeof(server));
	return sysfs_emit(buf, "%s\n", server);
}
static DEVICE_ATTR_RO(current_server);

static ssize_t connections_show(struct device *d,
				struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%u\n",
			  netblk_conn_count(netblk_from_device(d)));
}
static DEVICE_ATTR_RO(connections);

static struct attribute *netblk_attrs[] = {
	&dev_attr_servers.attr,
	&dev_attr_server_ip.attr,
	&dev_attr_server_port.attr,
	&dev_attr_export.attr,
	&dev_attr_request_timeout_ms.attr,
	&dev_attr_dead_timeout_ms.attr,
	&dev_attr_reconnect_retries.attr,
	&dev_attr_connect.attr,
	&dev_attr_disconnect.attr,
	&dev_attr_state.attr,
	&dev_attr_last_error.attr,
	&dev_attr_stats.attr,
	&dev_attr_connections.attr,
	&dev_attr_current_server.attr,
	NULL,
};

static const struct attribute_group netblk_attr_group = {
	.attrs = netblk_attrs,
};

const struct attribute_group *netblk_attr_groups[] = {
	&netblk_attr_group,
	NULL,
};
