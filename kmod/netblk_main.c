// SPDX-License-Identifier: GPL-2.0
/*
 * netblk: TLS-secured network block device.
 *
 * Module parameters, module init/exit and the device array.  The block
 * layer side lives in netblk_blk.c, socket I/O in netblk_sock.c, the
 * connection state machine and the handshake upcall in netblk_conn.c and
 * netblk_netlink.c, the sysfs control files in netblk_sysfs.c.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/blkdev.h>
#include <linux/kernel.h>
#include <linux/moduleparam.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <net/genetlink.h>

#include "netblk.h"

#define CREATE_TRACE_POINTS
#include "netblk_trace.h"

static unsigned int nr_devices = 1;
module_param(nr_devices, uint, 0444);
MODULE_PARM_DESC(nr_devices,
		 "Number of /dev/netblkN devices (1-16, default 1)");

unsigned int netblk_queue_depth = 64;
module_param_named(queue_depth, netblk_queue_depth, uint, 0444);
MODULE_PARM_DESC(queue_depth,
		 "Requests in flight per connection (1-1024, default 64)");

/* 0 until set: netblk_init() picks one per online CPU. */
unsigned int netblk_connections;
module_param_named(connections, netblk_connections, uint, 0444);
MODULE_PARM_DESC(connections,
		 "Connections (and hardware queues) per device (1-16, at most one per online CPU; default: one per online CPU)");

static int netblk_param_set_ms(const char *val, const struct kernel_param *kp)
{
	unsigned int ms;
	int err;

	err = kstrtouint(val, 0, &ms);
	if (err)
		return -EINVAL;
	if (ms < 100 || ms > 600000)
		return -EINVAL;
	*(unsigned int *)kp->arg = ms;
	return 0;
}

static const struct kernel_param_ops netblk_param_ms_ops = {
	.set = netblk_param_set_ms,
	.get = param_get_uint,
};

unsigned int netblk_handshake_timeout_ms = 30000;
module_param_cb(handshake_timeout_ms, &netblk_param_ms_ops,
		&netblk_handshake_timeout_ms, 0644);
__MODULE_PARM_TYPE(handshake_timeout_ms, "uint");
MODULE_PARM_DESC(handshake_timeout_ms,
		 "Time tls-bridge has from READY to DONE (100-600000 ms, default 30000)");

unsigned int netblk_connect_timeout_ms = 10000;
module_param_cb(connect_timeout_ms, &netblk_param_ms_ops,
		&netblk_connect_timeout_ms, 0644);
__MODULE_PARM_TYPE(connect_timeout_ms, "uint");
MODULE_PARM_DESC(connect_timeout_ms,
		 "TCP connect timeout (100-600000 ms, default 10000)");

int netblk_major;
static struct netblk_dev **netblk_devs;

static int netblk_dev_create(unsigned int index, struct netblk_dev **devp)
{
	struct netblk_dev *dev;
	int err = -ENOMEM;

	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev)
		return -ENOMEM;
	dev->nd_index = index;
	dev->nd_nr_conns = netblk_connections;
	netblk_conn_init(dev);

	dev->nd_ctl_wq = alloc_ordered_workqueue("netblk%u-ctl",
						 WQ_MEM_RECLAIM, index);
	if (!dev->nd_ctl_wq)
		goto out_free_dev;
	dev->nd_recv_wq = alloc_workqueue("netblk%u-recv",
					  WQ_MEM_RECLAIM | WQ_HIGHPRI |
					  WQ_UNBOUND, dev->nd_nr_conns, index);
	if (!dev->nd_recv_wq)
		goto out_destroy_ctl_wq;

	err = netblk_blk_init(dev);
	if (err)
		goto out_destroy_recv_wq;

	*devp = dev;
	return 0;

out_destroy_recv_wq:
	destroy_workqueue(dev->nd_recv_wq);
out_destroy_ctl_wq:
	destroy_workqueue(dev->nd_ctl_wq);
out_free_dev:
	netblk_conn_exit(dev);
	kfree(dev);
	return err;
}

static void netblk_dev_destroy(struct netblk_dev *dev)
{
	netblk_blk_exit(dev);
	destroy_workqueue(dev->nd_recv_wq);
	destroy_workqueue(dev->nd_ctl_wq);
	netblk_conn_exit(dev);
	kfree(dev);
}

static int netblk_dev_add(struct netblk_dev *dev)
{
	return netblk_blk_add(dev);
}

/* Stop the connection (every request completes or fails), then remove. */
static void netblk_dev_del(struct netblk_dev *dev)
{
	netblk_conn_stop(dev);
	netblk_blk_del(dev);
}

static void netblk_destroy_devs(unsigned int count)
{
	while (count--)
		netblk_dev_destroy(netblk_devs[count]);
}

static void netblk_del_devs(unsigned int count)
{
	while (count--)
		netblk_dev_del(netblk_devs[count]);
}

static int __init netblk_check_params(void)
{
	if (nr_devices < 1 || nr_devices > NETBLK_MAX_DEVICES) {
		pr_err("nr_devices must be 1-%d, not %u\n",
		       NETBLK_MAX_DEVICES, nr_devices);
		return -EINVAL;
	}
	if (netblk_queue_depth < 1 ||
	    netblk_queue_depth > NETBLK_MAX_QUEUE_DEPTH) {
		pr_err("queue_depth must be 1-%d, not %u\n",
		       NETBLK_MAX_QUEUE_DEPTH, netblk_queue_depth);
		return -EINVAL;
	}
	if (netblk_connections > NETBLK_MAX_CONNECTIONS) {
		pr_err("connections must be 1-%d, not %u\n",
		       NETBLK_MAX_CONNECTIONS, netblk_connections);
		return -EINVAL;
	}
	/* A hardware queue no CPU maps to would carry no I/O (as NVMe/TCP). */
	if (!netblk_connections || netblk_connections > num_online_cpus())
		netblk_connections = min_t(unsigned int, num_online_cpus(),
					   NETBLK_MAX_CONNECTIONS);
	return 0;
}

/*
 * Init and exit are mirror images: the block major, the devices (allocated
 * but invisible), the netlink family, then the disks appear.  Exit removes
 * the disks (stopping every connection first), so no handshake can name a
 * device any more, then unregisters the family, which waits for running
 * ACCEPT/DONE handlers, and only then frees the devices they may point to.
 */
static int __init netblk_init(void)
{
	unsigned int created, added;
	int err;

	BUILD_BUG_ON(sizeof(struct netblk_hello) != 16);
	BUILD_BUG_ON(sizeof(struct netblk_hello_reply) != 32);
	BUILD_BUG_ON(sizeof(struct netblk_request) != 32);
	BUILD_BUG_ON(sizeof(struct netblk_reply) != 16);
	BUILD_BUG_ON(NETBLK_MAX_PAYLOAD % NETBLK_BLOCK_SIZE);

	err = netblk_check_params();
	if (err)
		return err;

	netblk_hs_init();

	netblk_major = register_blkdev(0, "netblk");
	if (netblk_major < 0)
		return netblk_major;

	netblk_devs = kcalloc(nr_devices, sizeof(*netblk_devs), GFP_KERNEL);
	if (!netblk_devs) {
		err = -ENOMEM;
		goto out_unregister_blkdev;
	}

	for (created = 0; created < nr_devices; created++) {
		err = netblk_dev_create(created, &netblk_devs[created]);
		if (err)
			goto out_destroy_devs;
	}

	err = netblk_genl_init();
	if (err)
		goto out_destroy_devs;

	for (added = 0; added < nr_devices; added++) {
		err = netblk_dev_add(netblk_devs[added]);
		if (err)
			goto out_del_devs;
	}

	pr_info("%u device(s), block major %d, %u connection(s) of queue depth %u\n",
		nr_devices, netblk_major, netblk_connections,
		netblk_queue_depth);
	return 0;

out_del_devs:
	netblk_del_devs(added);
	netblk_genl_exit();
out_destroy_devs:
	netblk_destroy_devs(created);
	kfree(netblk_devs);
out_unregister_blkdev:
	unregister_blkdev(netblk_major, "netblk");
	return err;
}

static void __exit netblk_exit(void)
{
	netblk_del_devs(nr_devices);
	netblk_genl_exit();
	netblk_destroy_devs(nr_devices);
	kfree(netblk_devs);
	unregister_blkdev(netblk_major, "netblk");
}

module_init(netblk_init);
module_exit(netblk_exit);

MODULE_DESCRIPTION("netblk: TLS-secured network block device");
MODULE_AUTHOR("netblk project");
MODULE_LICENSE("GPL");
MODULE_VERSION("0.1.0");
MODULE_ALIAS_GENL_FAMILY(NETBLK_GENL_NAME);
MODULE_SOFTDEP("pre: tls");
