// SPDX-License-Identifier: GPL-2.0
/*
 * netblk: the "netblk" generic netlink family, the TLS handshake upcall.
 *
 *   READY  (driver -> "handshake" group) DEVICE: a socket awaits its
 *          handshake
 *   ACCEPT (helper -> driver, admin) -> DEVICE, SOCKFD, COOKIE, PEER_ADDR,
 *          PEER_PORT, EXPORT, TIMEOUT_MS; the socket is installed as SOCKFD
 *          (O_CLOEXEC) in the calling process; -ENOENT if none is pending
 *   DONE   (helper -> driver, admin) COOKIE, SOCKFD, STATUS, and REASON on
 *          failure or EXPORT_SIZE, EXPORT_FLAGS, MAX_PAYLOAD, MAX_INFLIGHT
 *          on success
 *
 * Like net/handshake/netlink.c, ACCEPT runs in the helper's process
 * context, which is what lets it install the fd there.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/fcntl.h>
#include <linux/file.h>
#include <linux/in6.h>
#include <net/genetlink.h>
#include <net/netlink.h>

#include "netblk.h"

static const struct nla_policy netblk_genl_policy[NETBLK_GENL_A_MAX + 1] = {
	[NETBLK_GENL_A_PAD]		= { .type = NLA_REJECT },
	[NETBLK_GENL_A_DEVICE]		= { .type = NLA_U32 },
	[NETBLK_GENL_A_SOCKFD]		= NLA_POLICY_MIN(NLA_S32, 0),
	[NETBLK_GENL_A_COOKIE]		= { .type = NLA_U64 },
	[NETBLK_GENL_A_PEER_ADDR]	= { .type = NLA_NUL_STRING,
					    .len = INET6_ADDRSTRLEN - 1 },
	[NETBLK_GENL_A_PEER_PORT]	= { .type = NLA_U16 },
	[NETBLK_GENL_A_EXPORT]		= { .type = NLA_NUL_STRING,
					    .len = NETBLK_MAX_EXPORT_NAME },
	[NETBLK_GENL_A_TIMEOUT_MS]	= { .type = NLA_U32 },
	[NETBLK_GENL_A_STATUS]		= NLA_POLICY_MAX(NLA_U32, MAX_ERRNO),
	[NETBLK_GENL_A_REASON]		= { .type = NLA_NUL_STRING,
					    .len = NETBLK_GENL_REASON_MAX },
	[NETBLK_GENL_A_EXPORT_SIZE]	= { .type = NLA_U64 },
	[NETBLK_GENL_A_EXPORT_FLAGS]	= { .type = NLA_U32 },
	[NETBLK_GENL_A_MAX_PAYLOAD]	= { .type = NLA_U32 },
	[NETBLK_GENL_A_MAX_INFLIGHT]	= { .type = NLA_U32 },
};

enum netblk_genl_mcgrp {
	NETBLK_GENL_MCGRP_HANDSHAKE_ID,
};

static const struct genl_multicast_group netblk_genl_mcgrps[] = {
	[NETBLK_GENL_MCGRP_HANDSHAKE_ID] = {
		.name = NETBLK_GENL_MCGRP_HANDSHAKE,
	},
};

static struct genl_family netblk_genl_family;

/**
 * netblk_genl_accept() - ACCEPT: hand the oldest pending socket to the
 *	caller
 * @skb: the request
 * @info: its parsed form
 *
 * Return: 0 with the reply sent; -ENOENT if no handshake is pending;
 * -EMFILE (or another errno of get_unused_fd_flags()) if the caller has no
 * free fd; -ENOMEM or -EMSGSIZE if the reply cannot be built.
 */
static int netblk_genl_accept(struct sk_buff *skb, struct genl_info *info)
{
	struct netblk_hs_req *req;
	struct sk_buff *msg;
	void *hdr;
	int fd, err;

	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0)
		return fd;

	req = netblk_hs_accept();
	if (!req) {
		err = -ENOENT;
		goto out_put_fd;
	}

	msg = genlmsg_new(NLMSG_DEFAULT_SIZE, GFP_KERNEL);
	if (!msg) {
		err = -ENOMEM;
		goto out_unaccept;
	}
	hdr = genlmsg_put_reply(msg, info, &netblk_genl_family, 0,
				NETBLK_GENL_CMD_ACCEPT);
	if (!hdr) {
		err = -EMSGSIZE;
		goto out_free_msg;
	}
	if (nla_put_u32(msg, NETBLK_GENL_A_DEVICE, req->hr_dev->nd_index) ||
	    nla_put_s32(msg, NETBLK_GENL_A_SOCKFD, fd) ||
	    nla_put_u64_64bit(msg, NETBLK_GENL_A_COOKIE, req->hr_cookie,
			      NETBLK_GENL_A_PAD) ||
	    nla_put_string(msg, NETBLK_GENL_A_PEER_ADDR, req->hr_peer) ||
	    nla_put_u16(msg, NETBLK_GENL_A_PEER_PORT, req->hr_port) ||
	    nla_put_string(msg, NETBLK_GENL_A_EXPORT, req->hr_export) ||
	    nla_put_u32(msg, NETBLK_GENL_A_TIMEOUT_MS,
			netblk_hs_remaining_ms(req))) {
		err = -EMSGSIZE;
		goto out_free_msg;
	}
	genlmsg_end(msg, hdr);

	/* Past this point the fd is the caller's; DONE or close ends it. */
	fd_install(fd, get_file(req->hr_nsock->ns_file));
	netblk_hs_put(req);
	return genlmsg_reply(msg, info);

out_free_msg:
	nlmsg_free(msg);
out_unaccept:
	netblk_hs_unaccept(req);
	netblk_hs_put(req);
out_put_fd:
	put_unused_fd(fd);
	return err;
}

/**
 * netblk_genl_done() - DONE: the helper reports a handshake's outcome
 * @skb: the request
 * @info: its parsed form
 *
 * Return: 0 when the outcome was taken; -EINVAL if COOKIE or STATUS is
 * missing, if a success lacks EXPORT_SIZE, EXPORT_FLAGS, MAX_PAYLOAD or
 * MAX_INFLIGHT or reports unusable values, or if the request was never
 * accepted; -EBADF if SOCKFD is not an open fd of the request's socket;
 * -ENOENT for an unknown or already finished cookie; -ENOTCONN or -EPROTO
 * for a success on a socket that is not connected or has no kTLS.
 */
static int netblk_genl_done(struct sk_buff *skb, struct genl_info *info)
{
	struct nlattr **attrs = info->attrs;
	struct netblk_params p = { };
	struct file *file = NULL;
	const char *reason = NULL;
	u32 status;
	u64 cookie;
	int err;

	if (GENL_REQ_ATTR_CHECK(info, NETBLK_GENL_A_COOKIE) ||
	    GENL_REQ_ATTR_CHECK(info, NETBLK_GENL_A_STATUS))
		return -EINVAL;
	cookie = nla_get_u64(attrs[NETBLK_GENL_A_COOKIE]);
	status = nla_get_u32(attrs[NETBLK_GENL_A_STATUS]);

	if (status) {
		if (attrs[NETBLK_GENL_A_REASON])
			reason = nla_data(attrs[NETBLK_GENL_A_REASON]);
	} else {
		if (GENL_REQ_ATTR_CHECK(info, NETBLK_GENL_A_SOCKFD) ||
		    GENL_REQ_ATTR_CHECK(info, NETBLK_GENL_A_EXPORT_SIZE) ||
		    GENL_REQ_ATTR_CHECK(info, NETBLK_GENL_A_EXPORT_FLAGS) ||
		    GENL_REQ_ATTR_CHECK(info, NETBLK_GENL_A_MAX_PAYLOAD) ||
		    GENL_REQ_ATTR_CHECK(info, NETBLK_GENL_A_MAX_INFLIGHT))
			return -EINVAL;
		p.np_export_size =
			nla_get_u64(attrs[NETBLK_GENL_A_EXPORT_SIZE]);
		p.np_export_flags =
			nla_get_u32(attrs[NETBLK_GENL_A_EXPORT_FLAGS]);
		p.np_max_payload =
			nla_get_u32(attrs[NETBLK_GENL_A_MAX_PAYLOAD]);
		p.np_max_inflight =
			nla_get_u32(attrs[NETBLK_GENL_A_MAX_INFLIGHT]);
	}

	if (attrs[NETBLK_GENL_A_SOCKFD]) {
		file = fget(nla_get_s32(attrs[NETBLK_GENL_A_SOCKFD]));
		if (!file) {
			NL_SET_ERR_MSG_ATTR(info->extack,
					    attrs[NETBLK_GENL_A_SOCKFD],
					    "not an open fd");
			return -EBADF;
		}
	}

	err = netblk_hs_done(cookie, file, status, reason, &p);
	if (file)
		fput(file);
	return err;
}

static const struct genl_small_ops netblk_genl_ops[] = {
	{
		.cmd	= NETBLK_GENL_CMD_ACCEPT,
		.flags	= GENL_ADMIN_PERM,
		.doit	= netblk_genl_accept,
	},
	{
		.cmd	= NETBLK_GENL_CMD_DONE,
		.flags	= GENL_ADMIN_PERM,
		.doit	= netblk_genl_done,
	},
};

static struct genl_family netblk_genl_family __ro_after_init = {
	.name		= NETBLK_GENL_NAME,
	.version	= NETBLK_GENL_VERSION,
	.maxattr	= NETBLK_GENL_A_MAX,
	.policy		= netblk_genl_policy,
	.module		= THIS_MODULE,
	.small_ops	= netblk_genl_ops,
	.n_small_ops	= ARRAY_SIZE(netblk_genl_ops),
	/*
	 * Zero: every command gets strict header and attribute checks, as
	 * include/net/genetlink.h asks of new families.
	 */
	.resv_start_op	= 0,
	.mcgrps		= netblk_genl_mcgrps,
	.n_mcgrps	= ARRAY_SIZE(netblk_genl_mcgrps),
};

/**
 * netblk_genl_has_listener() - is any helper subscribed to "handshake"?
 *
 * Return: true if the multicast group has a member in init_net.
 */
bool netblk_genl_has_listener(void)
{
	return genl_has_listeners(&netblk_genl_family, &init_net,
				  NETBLK_GENL_MCGRP_HANDSHAKE_ID);
}

/**
 * netblk_genl_ready() - multicast READY for a device's pending handshake
 * @device: N of /dev/netblkN
 *
 * Return: 0 if sent; -ESRCH if nobody listens; -ENOMEM or -EMSGSIZE if
 * the message cannot be built.
 */
int netblk_genl_ready(u32 device)
{
	struct sk_buff *msg;
	void *hdr;

	msg = genlmsg_new(NLMSG_GOODSIZE, GFP_KERNEL);
	if (!msg)
		return -ENOMEM;
	hdr = genlmsg_put(msg, 0, 0, &netblk_genl_family, 0,
			  NETBLK_GENL_CMD_READY);
	if (!hdr || nla_put_u32(msg, NETBLK_GENL_A_DEVICE, device)) {
		nlmsg_free(msg);
		return -EMSGSIZE;
	}
	genlmsg_end(msg, hdr);
	return genlmsg_multicast(&netblk_genl_family, msg, 0,
				 NETBLK_GENL_MCGRP_HANDSHAKE_ID, GFP_KERNEL);
}

/**
 * netblk_genl_init() - register the family
 *
 * Return: 0, or the errno of genl_register_family().
 */
int netblk_genl_init(void)
{
	return genl_register_family(&netblk_genl_family);
}

/**
 * netblk_genl_exit() - unregister the family; waits for running handlers
 */
void netblk_genl_exit(void)
{
	genl_unregister_family(&netblk_genl_family);
}
