// SPDX-License-Identifier: GPL-2.0
/*
 * The file store: a volume in a regular file (sparse) or a block device.
 * Every operation finishes before submit returns: pread and pwrite
 * (retried until whole; bytes past the end of a file read as zeros),
 * fdatasync, and discard by punching a hole, or by writing zeros where the
 * file system cannot punch.
 *
 * Like null_blk's badblocks, a FileStore can be told to fail ranges with
 * an errno (inject_error): the tests' way to make a store fail part way.
 */
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

/* Injected failures a store holds at most. */
#define FILE_MAX_FAULTS 8
/* Zeros written per call where holes cannot be punched. */
#define FILE_ZERO_CHUNK (64 << 10)

static const unsigned char file_zeros[FILE_ZERO_CHUNK];

struct file_fault {
	uint64_t start, end;	/* bytes [start, end) of the store */
	int error;
};

struct file_store {
	struct eng_store store;
	int fd;
	/* cleared once fallocate says the file system cannot punch holes */
	int punch;
	/* written with the GIL held, read by I/O threads: ->faults[i] is
	 * set before ->nfaults counts it */
	struct file_fault faults[FILE_MAX_FAULTS];
	int nfaults;
};

static struct file_store *file_of(struct eng_store *store)
{
	return (struct file_store *)store;
}

/* Bytes of @io before an injected failure, and that failure's errno (0:
 * none applies). */
static int file_fault(struct file_store *file, const struct eng_io *io,
		      uint64_t *good)
{
	int n = __atomic_load_n(&file->nfaults, __ATOMIC_ACQUIRE), i;
	int error = 0;

	*good = io->length;
	for (i = 0; i < n; i++) {
		const struct file_fault *fault = &file->faults[i];

		if (io->op == ENG_IO_FLUSH || fault->end <= io->offset ||
		    fault->start >= io->offset + io->length)
			continue;
		if (fault->start <= io->offset) {
			*good = 0;
			return fault->error;
		}
		if (fault->start - io->offset < *good) {
			*good = fault->start - io->offset;
			error = fault->error;
		}
	}
	return error;
}

static int file_pread(int fd, unsigned char *buf, uint64_t len, uint64_t pos)
{
	ssize_t got;

	while (len) {
		got = pread(fd, buf, len, (off_t)pos);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			return errno;
		if (!got) {	/* past the end of the file: a hole */
			memset(buf, 0, len);
			return 0;
		}
		buf += got;
		len -= (uint64_t)got;
		pos += (uint64_t)got;
	}
	return 0;
}

static int file_pwrite(int fd, const unsigned char *buf, uint64_t len,
		       uint64_t pos)
{
	ssize_t put;

	while (len) {
		put = pwrite(fd, buf, len, (off_t)pos);
		if (put < 0 && errno == EINTR)
			continue;
		if (put < 0)
			return errno;
		buf += put;
		len -= (uint64_t)put;
		pos += (uint64_t)put;
	}
	return 0;
}

/* Zero a range: punch a hole (it reads as zeros and frees the space), or
 * write zeros where the file system cannot. */
static int file_zero(struct file_store *file, uint64_t len, uint64_t pos)
{
	uint64_t chunk;
	int err;

	if (!len)
		return 0;
	if (__atomic_load_n(&file->punch, __ATOMIC_RELAXED)) {
		if (!fallocate(file->fd,
			       FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			       (off_t)pos, (off_t)len))
			return 0;
		if (errno != EOPNOTSUPP && errno != ENOSYS)
			return errno;
		__atomic_store_n(&file->punch, 0, __ATOMIC_RELAXED);
	}
	for (; len; len -= chunk, pos += chunk) {
		chunk = len < FILE_ZERO_CHUNK ? len : FILE_ZERO_CHUNK;
		err = file_pwrite(file->fd, file_zeros, chunk, pos);
		if (err)
			return err;
	}
	return 0;
}

static void file_submit(struct eng_store *store, struct eng_io *io)
{
	struct file_store *file = file_of(store);
	uint64_t good;
	int fault = file_fault(file, io, &good), err = 0;

	switch (io->op) {
	case ENG_IO_READ:
		err = fault ? fault :
			      file_pread(file->fd, io->buf, io->length,
					 io->offset);
		break;
	case ENG_IO_WRITE:
		err = file_pwrite(file->fd, io->buf, good, io->offset);
		break;
	case ENG_IO_DISCARD:
	case ENG_IO_WRITE_ZEROES:
		err = file_zero(file, good, io->offset);
		break;
	case ENG_IO_FLUSH:
		err = fdatasync(file->fd) ? errno : 0;
		break;
	}
	io->error = err ? err : fault;
	io->done = true;
}

static int64_t file_size(struct eng_store *store)
{
	struct file_store *file = file_of(store);
	uint64_t bytes;
	struct stat st;

	if (fstat(file->fd, &st))
		return -errno;
	if (!S_ISBLK(st.st_mode))
		return st.st_size;
	if (ioctl(file->fd, BLKGETSIZE64, &bytes))
		return -errno;
	return (int64_t)bytes;
}

static void file_release(struct eng_store *store)
{
	struct file_store *file = file_of(store);

	close(file->fd);
	PyMem_RawFree(file);
}

static const struct eng_store_ops file_ops = {
	.name = "file",
	.submit = file_submit,
	.size = file_size,
	.release = file_release,
};

/* ---- the FileStore type ----------------------------------------------- */

static PyObject *file_store_new(PyTypeObject *type, PyObject *args,
				PyObject *kwds)
{
	static char *kwlist[] = { "path", "writable", NULL };
	struct file_store *file;
	PyObject *path;
	EngStore *self;
	int writable, fd;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&$p:FileStore", kwlist,
					 PyUnicode_FSConverter, &path,
					 &writable))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	fd = open(PyBytes_AS_STRING(path),
		  (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	Py_END_ALLOW_THREADS
	if (fd < 0) {
		PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
		Py_DECREF(path);
		return NULL;
	}
	Py_DECREF(path);
	file = PyMem_RawCalloc(1, sizeof(*file));
	if (!file)
		goto close_fd;
	file->store.ops = &file_ops;
	file->store.writable = writable;
	file->fd = fd;
	file->punch = 1;
	self = (EngStore *)type->tp_alloc(type, 0);
	if (!self)
		goto free_file;
	self->store = &file->store;
	return (PyObject *)self;

free_file:
	PyMem_RawFree(file);
close_fd:
	close(fd);
	return PyErr_NoMemory();
}

PyDoc_STRVAR(file_inject_doc,
"inject_error(offset, length, errno, /) -> None\n\n"
"Fail every later read, write or zeroing that touches bytes\n"
"[offset, offset + length) of the store with errno; a write or zeroing\n"
"that starts before them still does its part before them (a store that\n"
"fails part way).  At most 8; clear_errors() forgets them.");

static PyObject *file_inject_error(EngStore *self, PyObject *args)
{
	struct file_store *file = file_of(self->store);
	unsigned long long offset, length;
	int error;

	if (!PyArg_ParseTuple(args, "KKi:inject_error", &offset, &length,
			      &error))
		return NULL;
	if (error <= 0 || !length || offset + length < offset) {
		PyErr_SetString(PyExc_ValueError,
				"an errno > 0 and a non-empty range");
		return NULL;
	}
	if (file->nfaults == FILE_MAX_FAULTS) {
		PyErr_SetString(PyExc_ValueError, "too many injected errors");
		return NULL;
	}
	file->faults[file->nfaults] = (struct file_fault){
		.start = offset, .end = offset + length, .error = error,
	};
	__atomic_store_n(&file->nfaults, file->nfaults + 1, __ATOMIC_RELEASE);
	Py_RETURN_NONE;
}

static PyObject *file_clear_errors(EngStore *self, PyObject *Py_UNUSED(unused))
{
	__atomic_store_n(&file_of(self->store)->nfaults, 0, __ATOMIC_RELEASE);
	Py_RETURN_NONE;
}

static PyMethodDef file_store_methods[] = {
	{ "inject_error", (PyCFunction)file_inject_error, METH_VARARGS,
	  file_inject_doc },
	{ "clear_errors", (PyCFunction)file_clear_errors, METH_NOARGS,
	  "clear_errors() -> None\n\nForget every injected error." },
	{ NULL },
};

PyTypeObject eng_file_store_type = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "storaged._engine.FileStore",
	.tp_doc = "FileStore(path, *, writable)\n\n"
		  "A volume's bytes in a file or block device.",
	.tp_basicsize = sizeof(EngStore),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_base = &eng_store_type,
	.tp_new = file_store_new,
	.tp_methods = file_store_methods,
};
