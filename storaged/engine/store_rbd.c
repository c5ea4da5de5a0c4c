// SPDX-License-Identifier: GPL-2.0
/*
 * The RBD store: a volume in a Ceph RADOS Block Device image, through
 * librbd's C API.  A batch is submitted as a whole (rbd_aio_read, _write,
 * _discard, _write_zeroes, _flush: one completion per operation, all in
 * flight at once) and waited for as a whole, so a batch costs the cluster
 * one round trip, not one per request.  librbd has no per-write FUA: the
 * engine's flush after a batch with FUA requests is rbd_aio_flush.
 *
 * The image holds exactly what a file volume holds, LUKS2 ciphertext at the
 * same offsets, so the cluster never sees plaintext and a file volume
 * `rbd import`ed is a valid image.  Opening sets rbd_skip_partial_discard
 * to false (with librbd's default a discard smaller than an object keeps
 * the old data, and a TRIM must read back as zeros) and turns librbd's
 * write cache off (rbds_settings).
 *
 * Fencing is Ceph's managed exclusive lock (lock(), lock_owners(),
 * break_lock()): breaking an owner's lock blocklists it, so its late
 * writes fail (EBLOCKLISTED, which is ESHUTDOWN) instead of landing, and
 * the store says it is fenced.  read_object() and write_object() keep
 * small RADOS objects beside the image: the active's lease
 * (storaged/failover.py).
 */
#include "engine.h"

#include <errno.h>
#include <rbd/librbd.h>
#include <string.h>

/* Lock owners a lock_owners() call lists at most. */
#define RBD_MAX_OWNERS 16
/* The largest object read_object() reads: leases are a few dozen bytes. */
#define RBD_MAX_SMALL_OBJECT 4096

struct rbds_store {
	struct eng_store store;
	rados_t cluster;
	rados_ioctx_t ioctx;
	rbd_image_t image;
};

static struct rbds_store *rbds_of(struct eng_store *store)
{
	return (struct rbds_store *)store;
}

/* A result of ESHUTDOWN (EBLOCKLISTED) means another client broke our
 * lock and took the image over: the store refuses everything from now on. */
static void rbds_check_fenced(struct eng_store *store, int64_t result)
{
	if (result == -ESHUTDOWN)
		__atomic_store_n(&store->fenced, true, __ATOMIC_RELAXED);
}

static void rbds_submit(struct eng_store *store, struct eng_io *io)
{
	struct rbds_store *rbd = rbds_of(store);
	rbd_completion_t done;
	int err;

	err = rbd_aio_create_completion(NULL, NULL, &done);
	if (err < 0)
		goto failed;
	switch (io->op) {
	case ENG_IO_READ:
		err = rbd_aio_read(rbd->image, io->offset, io->length,
				   (char *)io->buf, done);
		break;
	case ENG_IO_WRITE:
		err = rbd_aio_write(rbd->image, io->offset, io->length,
				    (const char *)io->buf, done);
		break;
	case ENG_IO_DISCARD:
		err = rbd_aio_discard(rbd->image, io->offset, io->length,
				      done);
		break;
	case ENG_IO_WRITE_ZEROES:
		err = rbd_aio_write_zeroes(rbd->image, io->offset, io->length,
					   done, 0, 0);
		break;
	case ENG_IO_FLUSH:
		err = rbd_aio_flush(rbd->image, done);
		break;
	}
	if (err < 0) {
		rbd_aio_release(done);
		goto failed;
	}
	io->pending = done;
	return;

failed:
	io->error = -err;
	io->done = true;
}

static void rbds_wait(struct eng_store *store, struct eng_io *ios,
		      size_t count)
{
	size_t i;
	ssize_t got;

	for (i = 0; i < count; i++) {
		struct eng_io *io = &ios[i];

		if (io->done)
			continue;
		rbd_aio_wait_for_complete(io->pending);
		got = rbd_aio_get_return_value(io->pending);
		rbd_aio_release(io->pending);
		io->pending = NULL;
		rbds_check_fenced(store, got);
		if (got < 0)
			io->error = (int)-got;
		else if (io->op == ENG_IO_READ && (uint64_t)got < io->length)
			/* past the end of the image: a hole */
			memset(io->buf + got, 0, io->length - (uint64_t)got);
		io->done = true;
	}
}

static int64_t rbds_size(struct eng_store *store)
{
	uint64_t size;
	int err = rbd_get_size(rbds_of(store)->image, &size);

	return err < 0 ? err : (int64_t)size;
}

/* Close what rbds_connect() opened, in reverse. */
static void rbds_close_all(struct rbds_store *rbd)
{
	if (rbd->image)
		rbd_close(rbd->image);
	if (rbd->ioctx)
		rados_ioctx_destroy(rbd->ioctx);
	if (rbd->cluster)
		rados_shutdown(rbd->cluster);
}

static void rbds_release(struct eng_store *store)
{
	struct rbds_store *rbd = rbds_of(store);

	rbds_close_all(rbd);
	PyMem_RawFree(rbd);
}

static const struct eng_store_ops rbds_ops = {
	.name = "rbd",
	.submit = rbds_submit,
	.wait = rbds_wait,
	.size = rbds_size,
	.release = rbds_release,
};

/*
 * What storaged sets whatever ceph.conf says.  A TRIM must read back as
 * zeros (librbd's default skips discards smaller than an object).  No
 * client-side write cache: a write is acknowledged once the OSDs have it,
 * so a storaged that is killed loses nothing it acknowledged and a standby
 * that takes over reads every acknowledged write.  Connecting and monitor
 * calls give up after a while instead of hanging start-up; data operations
 * keep waiting through a cluster's recovery (the client's own timeouts
 * decide when a request has taken too long).
 */
static const char *const rbds_settings[][2] = {
	{ "rbd_skip_partial_discard", "false" },
	{ "rbd_cache", "false" },
	{ "client_mount_timeout", "30" },
	{ "rados_mon_op_timeout", "30" },
};

struct rbds_target {
	const char *pool, *image, *conf, *client, *keyring;
};

/* Connect to the cluster and open the pool (blocks: no GIL).  Returns 0,
 * or a negative errno with *@step naming what failed. */
static int rbds_pool(struct rbds_store *rbd, const struct rbds_target *t,
		     const char **step)
{
	size_t i;
	int err;

	*step = "rados_create";
	err = rados_create(&rbd->cluster, t->client);
	if (err < 0) {
		rbd->cluster = NULL;
		return err;
	}
	*step = "reading the ceph.conf";
	err = rados_conf_read_file(rbd->cluster, t->conf);
	if (err < 0)
		return err;
	*step = "setting the keyring";
	if (t->keyring) {
		err = rados_conf_set(rbd->cluster, "keyring", t->keyring);
		if (err < 0)
			return err;
	}
	*step = "setting storaged's librbd options";
	for (i = 0; i < sizeof(rbds_settings) / sizeof(rbds_settings[0]); i++) {
		err = rados_conf_set(rbd->cluster, rbds_settings[i][0],
				     rbds_settings[i][1]);
		if (err < 0)
			return err;
	}
	*step = "connecting to the cluster";
	err = rados_connect(rbd->cluster);
	if (err < 0)
		return err;
	*step = "opening the pool";
	err = rados_ioctx_create(rbd->cluster, t->pool, &rbd->ioctx);
	if (err < 0)
		rbd->ioctx = NULL;
	return err;
}

/* rbds_pool(), then open the image; the same contract. */
static int rbds_connect(struct rbds_store *rbd, const struct rbds_target *t,
			const char **step)
{
	int err = rbds_pool(rbd, t, step);

	if (err < 0)
		return err;
	*step = "opening the image";
	err = rbd_open(rbd->ioctx, t->image, &rbd->image, NULL);
	if (err < 0)
		rbd->image = NULL;
	return err;
}

/* ---- the RbdStore type ------------------------------------------------ */

/* OSError(errno, "rbd POOL/IMAGE: STEP: why"), set; returns NULL. */
static PyObject *rbds_error(int err, const char *step,
			   const struct rbds_target *t)
{
	PyObject *why, *exc_args;

	why = PyUnicode_FromFormat("rbd %s/%s: %s: %s", t->pool, t->image,
				   step, strerror(-err));
	if (!why)
		return NULL;
	exc_args = Py_BuildValue("(iN)", -err, why);
	if (exc_args) {
		PyErr_SetObject(PyExc_OSError, exc_args);
		Py_DECREF(exc_args);
	}
	return NULL;
}

/* OSError from a negative librbd/librados result, set; returns NULL. */
static PyObject *rbds_oserror(int err)
{
	errno = -err;
	return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *rbds_new(PyTypeObject *type, PyObject *args,
			       PyObject *kwds)
{
	static char *kwlist[] = { "pool", "image", "conf", "client", "keyring",
				  "writable", NULL };
	struct rbds_target t = { .keyring = NULL };
	struct rbds_store *rbd;
	const char *step;
	EngStore *self;
	int writable, err;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "ss$sszp:RbdStore",
					 kwlist, &t.pool, &t.image, &t.conf,
					 &t.client, &t.keyring, &writable))
		return NULL;
	rbd = PyMem_RawCalloc(1, sizeof(*rbd));
	if (!rbd)
		return PyErr_NoMemory();
	rbd->store.ops = &rbds_ops;
	rbd->store.writable = writable;
	Py_BEGIN_ALLOW_THREADS
	err = rbds_connect(rbd, &t, &step);
	if (err < 0)
		rbds_close_all(rbd);
	Py_END_ALLOW_THREADS
	if (err < 0) {
		PyMem_RawFree(rbd);
		return rbds_error(err, step, &t);
	}
	self = (EngStore *)type->tp_alloc(type, 0);
	if (!self) {
		Py_BEGIN_ALLOW_THREADS
		rbds_release(&rbd->store);
		Py_END_ALLOW_THREADS
		return NULL;
	}
	self->store = &rbd->store;
	return (PyObject *)self;
}

PyDoc_STRVAR(rbds_lock_doc,
"lock() -> bool\n\n"
"Take the image's managed exclusive lock: True if this store holds it\n"
"now, False if another client does.  Raises OSError otherwise.");

static PyObject *rbds_lock(EngStore *self, PyObject *Py_UNUSED(unused))
{
	rbd_image_t image = rbds_of(self->store)->image;
	int err;

	Py_BEGIN_ALLOW_THREADS
	err = rbd_lock_acquire(image, RBD_LOCK_MODE_EXCLUSIVE);
	Py_END_ALLOW_THREADS
	if (err == -EROFS || err == -EBUSY)
		Py_RETURN_FALSE;
	if (err < 0)
		return rbds_oserror(err);
	Py_RETURN_TRUE;
}

PyDoc_STRVAR(rbds_unlock_doc,
"unlock() -> None\n\n"
"Release the image's managed exclusive lock this store holds, so that a\n"
"standby takes it without breaking it.  Raises OSError as librbd fails.");

static PyObject *rbds_unlock(EngStore *self, PyObject *Py_UNUSED(unused))
{
	rbd_image_t image = rbds_of(self->store)->image;
	int err;

	Py_BEGIN_ALLOW_THREADS
	err = rbd_lock_release(image);
	Py_END_ALLOW_THREADS
	if (err < 0)
		return rbds_oserror(err);
	Py_RETURN_NONE;
}

PyDoc_STRVAR(rbds_owners_doc,
"lock_owners() -> list[str]\n\n"
"Who holds the image's managed exclusive lock (empty: nobody).");

static PyObject *rbds_lock_owners(EngStore *self, PyObject *Py_UNUSED(unused))
{
	rbd_image_t image = rbds_of(self->store)->image;
	char *owners[RBD_MAX_OWNERS];
	size_t count = RBD_MAX_OWNERS, i;
	rbd_lock_mode_t mode;
	PyObject *list;
	int err;

	Py_BEGIN_ALLOW_THREADS
	err = rbd_lock_get_owners(image, &mode, owners, &count);
	Py_END_ALLOW_THREADS
	if (err == -ENOENT)
		return PyList_New(0);
	if (err < 0)
		return rbds_oserror(err);
	list = PyList_New((Py_ssize_t)count);
	for (i = 0; list && i < count; i++) {
		PyObject *owner = PyUnicode_FromString(owners[i]);

		if (!owner)
			Py_CLEAR(list);
		else
			PyList_SET_ITEM(list, (Py_ssize_t)i, owner);
	}
	rbd_lock_get_owners_cleanup(owners, count);
	return list;
}

PyDoc_STRVAR(rbds_break_doc,
"break_lock(owner, /) -> None\n\n"
"Break owner's managed exclusive lock; Ceph blocklists owner, so its\n"
"later writes fail.  Raises OSError as librbd fails.");

static PyObject *rbds_break_lock(EngStore *self, PyObject *arg)
{
	rbd_image_t image = rbds_of(self->store)->image;
	const char *owner = PyUnicode_AsUTF8(arg);
	int err;

	if (!owner)
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	err = rbd_lock_break(image, RBD_LOCK_MODE_EXCLUSIVE, owner);
	Py_END_ALLOW_THREADS
	if (err < 0)
		return rbds_oserror(err);
	Py_RETURN_NONE;
}

PyDoc_STRVAR(rbds_read_object_doc,
"read_object(name, /) -> bytes\n\n"
"The RADOS object name in the image's pool (at most 4 KiB of it; empty\n"
"if there is none).  Raises OSError as librados fails.");

static PyObject *rbds_read_object(EngStore *self, PyObject *arg)
{
	rados_ioctx_t ioctx = rbds_of(self->store)->ioctx;
	const char *name = PyUnicode_AsUTF8(arg);
	char buf[RBD_MAX_SMALL_OBJECT];
	int got;

	if (!name)
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	got = rados_read(ioctx, name, buf, sizeof(buf), 0);
	Py_END_ALLOW_THREADS
	if (got == -ENOENT)
		got = 0;
	if (got < 0)
		return rbds_oserror(got);
	return PyBytes_FromStringAndSize(buf, got);
}

PyDoc_STRVAR(rbds_write_object_doc,
"write_object(name, data, /) -> None\n\n"
"Replace the RADOS object name in the image's pool with data (at most\n"
"4 KiB).  Raises OSError as librados fails: ESHUTDOWN once blocklisted.");

static PyObject *rbds_write_object(EngStore *self, PyObject *args)
{
	struct eng_store *store = self->store;
	rados_ioctx_t ioctx = rbds_of(store)->ioctx;
	const char *name;
	Py_buffer data;
	int err;

	if (!PyArg_ParseTuple(args, "sy*:write_object", &name, &data))
		return NULL;
	if (data.len > RBD_MAX_SMALL_OBJECT) {
		PyBuffer_Release(&data);
		PyErr_SetString(PyExc_ValueError, "at most 4 KiB");
		return NULL;
	}
	Py_BEGIN_ALLOW_THREADS
	err = rados_write_full(ioctx, name, data.buf, (size_t)data.len);
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&data);
	rbds_check_fenced(store, err);
	if (err < 0)
		return rbds_oserror(err);
	Py_RETURN_NONE;
}

PyDoc_STRVAR(rbds_create_doc,
"create(pool, image, size, *, conf, client, keyring) -> None\n\n"
"Create an RBD image of size bytes with the cluster's default features\n"
"(exclusive-lock among them, which the managed lock needs).  Raises\n"
"OSError naming the step: EEXIST if the image exists.");

static PyObject *rbds_create(PyObject *Py_UNUSED(cls), PyObject *args,
			     PyObject *kwds)
{
	static char *kwlist[] = { "pool", "image", "size", "conf", "client",
				  "keyring", NULL };
	struct rbds_target t = { .keyring = NULL };
	struct rbds_store rbd = { .cluster = NULL };
	unsigned long long size;
	const char *step;
	int order = 0, err;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "ssK$ssz:create", kwlist,
					 &t.pool, &t.image, &size, &t.conf,
					 &t.client, &t.keyring))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	err = rbds_pool(&rbd, &t, &step);
	if (!err) {
		step = "creating the image";
		err = rbd_create(rbd.ioctx, t.image, size, &order);
	}
	rbds_close_all(&rbd);
	Py_END_ALLOW_THREADS
	if (err < 0)
		return rbds_error(err, step, &t);
	Py_RETURN_NONE;
}

static PyMethodDef rbds_methods[] = {
	{ "create", (PyCFunction)(void (*)(void))rbds_create,
	  METH_VARARGS | METH_KEYWORDS | METH_STATIC, rbds_create_doc },
	{ "lock", (PyCFunction)rbds_lock, METH_NOARGS, rbds_lock_doc },
	{ "unlock", (PyCFunction)rbds_unlock, METH_NOARGS, rbds_unlock_doc },
	{ "lock_owners", (PyCFunction)rbds_lock_owners, METH_NOARGS,
	  rbds_owners_doc },
	{ "break_lock", (PyCFunction)rbds_break_lock, METH_O, rbds_break_doc },
	{ "read_object", (PyCFunction)rbds_read_object, METH_O,
	  rbds_read_object_doc },
	{ "write_object", (PyCFunction)rbds_write_object, METH_VARARGS,
	  rbds_write_object_doc },
	{ NULL },
};

PyTypeObject eng_rbd_store_type = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "storaged._engine.RbdStore",
	.tp_doc = "RbdStore(pool, image, *, conf, client, keyring, writable)\n\n"
		  "A volume's bytes in a Ceph RBD image (client: the cephx id "
		  "without 'client.'; keyring: None for ceph.conf's).",
	.tp_basicsize = sizeof(EngStore),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_base = &eng_store_type,
	.tp_new = rbds_new,
	.tp_methods = rbds_methods,
};
