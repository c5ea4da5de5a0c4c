// SPDX-License-Identifier: GPL-2.0
/*
 * netblk: control files under /sys/block/netblkN/.
 *
 *   server_ip, server_port, export     where to connect (rw; -EBUSY unless
 *                                      disconnected or in error)
 *   request_timeout_ms, dead_timeout_ms, reconnect_retries
 *                                      failure handling (rw, any time)
 *   connect, disconnect                write "1" (wo)
 *   state, last_error, stats, connections
 *                                      what is going on (ro)
 *
 * Every store parses the whole value (one trailing newline allowed) and
 * returns -EINVAL without changing anything when it is not valid.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/blkdev.h>
#include <linux/device.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/inet.h>
#include <linux/kernel.h>
#include <linux/string.h>
#include <linux/sysfs.h>

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

/* --- server_ip ---------------------------------------------------------- */

static int netblk_parse_ip(const char *buf, size_t count,
			   struct sockaddr_storage *ss)
{
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
	struct sockaddr_in *sin = (struct sockaddr_in *)ss;
	size_t len = netblk_value_len(buf, count, INET6_ADDRSTRLEN - 1);
	const char *end;

	if (!len)
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

static ssize_t server_ip_show(struct device *d, struct device_attribute *attr,
			      char *buf)
{
	struct netblk_dev *dev = netblk_from_device(d);
	struct sockaddr_storage *ss = &dev->nd_conf.cf_addr;
	ssize_t ret;

	mutex_lock(&dev->nd_lock);
	if (ss->ss_family == AF_INET)
		ret = sysfs_emit(buf, "%pI4\n",
				 &((struct sockaddr_in *)ss)->sin_addr);
	else if (ss->ss_family == AF_INET6)
		ret = sysfs_emit(buf, "%pI6c\n",
				 &((struct sockaddr_in6 *)ss)->sin6_addr);
	else
		ret = sysfs_emit(buf, "\n");
	mutex_unlock(&dev->nd_lock);
	return ret;
}

static ssize_t server_ip_store(struct device *d, struct device_attribute *attr,
			       const char *buf, size_t count)
{
	struct netblk_dev *dev = netblk_from_device(d);
	struct sockaddr_storage ss;
	ssize_t ret = count;

	if (netblk_parse_ip(buf, count, &ss))
		return -EINVAL;

	mutex_lock(&dev->nd_lock);
	if (netblk_conn_idle(dev))
		dev->nd_conf.cf_addr = ss;
	else
		ret = -EBUSY;
	mutex_unlock(&dev->nd_lock);
	return ret;
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

NETBLK_U32_ATTR(request_timeout_ms, 100, 3600000, netblk_blk_set_timeout);
NETBLK_U32_ATTR(dead_timeout_ms, 0, 86400000, NULL);
NETBLK_U32_ATTR(reconnect_retries, 0, 1000000, NULL);

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

	return sysfs_emit(buf,
			  "read_bytes: %lld\n"
			  "write_bytes: %lld\n"
			  "read_requests: %lld\n"
			  "write_requests: %lld\n"
			  "flush_requests: %lld\n"
			  "discard_requests: %lld\n"
			  "write_zeroes_requests: %lld\n"
			  "errors: %lld\n"
			  "timeouts: %lld\n"
			  "reconnects: %lld\n"
			  "inflight: %d\n",
			  atomic64_read(&st->st_read_bytes),
			  atomic64_read(&st->st_write_bytes),
			  atomic64_read(&st->st_read_requests),
			  atomic64_read(&st->st_write_requests),
			  atomic64_read(&st->st_flush_requests),
			  atomic64_read(&st->st_discard_requests),
			  atomic64_read(&st->st_write_zeroes_requests),
			  atomic64_read(&st->st_errors),
			  atomic64_read(&st->st_timeouts),
			  atomic64_read(&st->st_reconnects),
			  atomic_read(&st->st_inflight));
}
static DEVICE_ATTR_RO(stats);

static ssize_t connections_show(struct device *d,
				struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%u\n",
			  netblk_conn_count(netblk_from_device(d)));
}
static DEVICE_ATTR_RO(connections);

static struct attribute *netblk_attrs[] = {
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
	NULL,
};

static const struct attribute_group netblk_attr_group = {
	.attrs = netblk_attrs,
};

const struct attribute_group *netblk_attr_groups[] = {
	&netblk_attr_group,
	NULL,
};
