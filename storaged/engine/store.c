// SPDX-License-Identifier: GPL-2.0
/*
 * The store interface (struct eng_store_ops in engine.h): where a volume's
 * bytes live.  The engine hands a store a whole batch of operations and
 * then waits for the whole batch, so a store may run them one after
 * another (the file store) or all at once (an asynchronous one, such as
 * librbd's aio calls).  The Store type is the Python face every store
 * shares: its size and a flush.
 */
#include "engine.h"

#include <errno.h>

/**
 * eng_store_run - submit @count ios to @store and wait for all of them
 * @store: the store
 * @ios: the batch; each one's ->error and ->done are set on return
 * @count: how many
 *
 * Runs without the GIL.
 */
void eng_store_run(struct eng_store *store, struct eng_io *ios, size_t count)
{
	size_t i;

	for (i = 0; i < count; i++) {
		ios[i].done = false;
		ios[i].error = 0;
		if (ios[i].op != ENG_IO_READ && ios[i].op != ENG_IO_FLUSH &&
		    !store->writable) {
			ios[i].error = EROFS;
			ios[i].done = true;
			continue;
		}
		store->ops->submit(store, &ios[i]);
	}
	if (store->ops->wait)
		store->ops->wait(store, ios, count);
	for (i = 0; i < count; i++)
		if (ios[i].op == ENG_IO_FLUSH && !ios[i].error)
			__atomic_add_fetch(&store->syncs, 1, __ATOMIC_RELAXED);
}

static void store_dealloc(EngStore *self)
{
	struct eng_store *store = self->store;

	/* closing may wait for the cluster (an image's last flush) */
	if (store) {
		Py_BEGIN_ALLOW_THREADS
		store->ops->release(store);
		Py_END_ALLOW_THREADS
	}
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The store, or NULL with an exception if it was never set up. */
static struct eng_store *store_of(EngStore *self)
{
	if (!self->store)
		PyErr_SetString(PyExc_RuntimeError, "store not set up");
	return self->store;
}

static PyObject *store_size(EngStore *self, void *Py_UNUSED(closure))
{
	struct eng_store *store = store_of(self);
	int64_t size;

	if (!store)
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	size = store->ops->size(store);
	Py_END_ALLOW_THREADS
	if (size < 0) {
		errno = (int)-size;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	return PyLong_FromLongLong(size);
}

static PyObject *store_syncs(EngStore *self, void *Py_UNUSED(closure))
{
	struct eng_store *store = store_of(self);

	return store ? PyLong_FromUnsignedLongLong(__atomic_load_n(
			       &store->syncs, __ATOMIC_RELAXED)) :
		       NULL;
}

static PyObject *store_fenced(EngStore *self, void *Py_UNUSED(closure))
{
	struct eng_store *store = store_of(self);

	return store ? PyBool_FromLong(__atomic_load_n(&store->fenced,
						       __ATOMIC_RELAXED)) :
		       NULL;
}

static PyObject *store_writable(EngStore *self, void *Py_UNUSED(closure))
{
	struct eng_store *store = store_of(self);

	return store ? PyBool_FromLong(store->writable) : NULL;
}

PyDoc_STRVAR(store_flush_doc,
"flush() -> None\n\n"
"Make every completed write durable; raises OSError as the store failed.");

static PyObject *store_flush(EngStore *self, PyObject *Py_UNUSED(unused))
{
	struct eng_store *store = store_of(self);
	struct eng_io io = { .op = ENG_IO_FLUSH };

	if (!store)
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	eng_store_run(store, &io, 1);
	Py_END_ALLOW_THREADS
	if (io.error) {
		errno = io.error;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	Py_RETURN_NONE;
}

/* Run one @io on @self's store without the GIL; 0, or -1 with OSError. */
static int store_one(EngStore *self, struct eng_io *io)
{
	struct eng_store *store = store_of(self);

	if (!store)
		return -1;
	Py_BEGIN_ALLOW_THREADS
	eng_store_run(store, io, 1);
	Py_END_ALLOW_THREADS
	if (!io->error)
		return 0;
	errno = io->error;
	PyErr_SetFromErrno(PyExc_OSError);
	return -1;
}

PyDoc_STRVAR(store_pread_doc,
"pread(offset, length, /) -> bytes\n\n"
"The store's bytes as they lie (a LUKS2 header, ciphertext); past the end\n"
"reads zeros.");

static PyObject *store_pread(EngStore *self, PyObject *args)
{
	struct eng_io io = { .op = ENG_IO_READ };
	unsigned long long offset;
	Py_ssize_t length;
	PyObject *data;

	if (!PyArg_ParseTuple(args, "Kn:pread", &offset, &length))
		return NULL;
	if (length < 0) {
		PyErr_SetString(PyExc_ValueError, "negative length");
		return NULL;
	}
	data = PyBytes_FromStringAndSize(NULL, length);
	if (!data)
		return NULL;
	io.offset = offset;
	io.length = (uint64_t)length;
	io.buf = (unsigned char *)PyBytes_AS_STRING(data);
	if (store_one(self, &io))
		Py_CLEAR(data);
	return data;
}

PyDoc_STRVAR(store_pwrite_doc,
"pwrite(offset, data, /) -> None\n\n"
"Write data as it is at offset (a LUKS2 header); not durable until\n"
"flush().");

static PyObject *store_pwrite(EngStore *self, PyObject *args)
{
	struct eng_io io = { .op = ENG_IO_WRITE };
	unsigned long long offset;
	Py_buffer data;
	int failed;

	if (!PyArg_ParseTuple(args, "Ky*:pwrite", &offset, &data))
		return NULL;
	io.offset = offset;
	io.length = (uint64_t)data.len;
	io.buf = data.buf;
	failed = store_one(self, &io);
	PyBuffer_Release(&data);
	if (failed)
		return NULL;
	Py_RETURN_NONE;
}

static PyMethodDef store_methods[] = {
	{ "flush", (PyCFunction)store_flush, METH_NOARGS, store_flush_doc },
	{ "pread", (PyCFunction)store_pread, METH_VARARGS, store_pread_doc },
	{ "pwrite", (PyCFunction)store_pwrite, METH_VARARGS,
	  store_pwrite_doc },
	{ NULL },
};

static PyGetSetDef store_getset[] = {
	{ "size", (getter)store_size, NULL, "bytes the store holds", NULL },
	{ "writable", (getter)store_writable, NULL,
	  "whether it takes writes", NULL },
	{ "syncs", (getter)store_syncs, NULL,
	  "flushes that made writes durable: FLUSHes, batches with FUA", NULL },
	{ "fenced", (getter)store_fenced, NULL,
	  "whether the store refused an operation because another client "
	  "took the volume over (it refuses every later one too)", NULL },
	{ NULL },
};

PyTypeObject eng_store_type = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "storaged._engine.Store",
	.tp_doc = "Where a volume's bytes live (FileStore is one).",
	.tp_basicsize = sizeof(EngStore),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
	.tp_dealloc = (destructor)store_dealloc,
	.tp_methods = store_methods,
	.tp_getset = store_getset,
};
