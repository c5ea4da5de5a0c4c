// SPDX-License-Identifier: GPL-2.0
/*
 * storaged._requests: a connection's plain READs and WRITEs, and their
 * statistics, in C.
 *
 * At queue depth most of a request's user time in storaged was Python:
 * decoding the header, the validity checks, the call chain down to the
 * volume key, the reply header and the statistics record, each a few
 * microseconds on the host and about forty times that under emulation.
 * Runner.run() takes the leading frames of a connection's receive buffer
 * that are READs or WRITEs without flags, valid and complete, and runs
 * each as storaged.volume.Volume.read or .write would: the sector cache
 * through its own methods (lookup, fill, invalidate), the file I/O and
 * AES-XTS through the volume key's pread and pwrite.
 *
 * It stops, consuming nothing of it, at the first frame it does not take:
 * another opcode, any flag (FUA), any check that fails, a handle still in
 * flight, an incomplete frame, or file I/O that failed.  The Python codec
 * (storaged.protocol.codec) decides about that frame, so every refusal,
 * protocol error and I/O error report stays in one place; a request whose
 * pread or pwrite failed runs once more there, which repeats the failure
 * (a READ and a whole-range WRITE are idempotent; such a READ asks the
 * cache twice, so its miss counts twice; such a WRITE's sectors leave the
 * cache there, as Volume.write drops them however it ends).  It takes
 * exactly the frames the codec makes READs and WRITEs without flags of,
 * whose sectors' tweaks plain64 can hold: tests/storaged/test_requests.py
 * runs both on the same frames.
 *
 * tally() sums a batch's statistics records (the runner's and the Python
 * path's) for storaged.stats.IoCounters in one pass instead of a Python
 * loop per request: tests/storaged/test_stats.py holds it to a Python
 * reference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <endian.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <linux/netblk.h>

/* plain64 counts 512-byte units whatever the sector size. */
#define REQ_IV_UNIT 512

/* Everything is set when the runner is made and only read after. */
typedef struct {
	PyObject_HEAD
	/* the volume key's bound pread and pwrite (storaged._xts.Key) */
	PyObject *pread, *pwrite;
	/* the sector cache's bound lookup, fill and invalidate */
	PyObject *lookup, *fill, *invalidate;
	PyObject *volume_id;	/* the cache's key for this volume */
	/* The runner's own duplicate of the volume file's descriptor: a
	 * connection thread still running when the volume is closed (a stuck
	 * one at shutdown) must not write to whatever reuses its number. */
	int fd;
	PyObject *fd_arg;	/* fd, as an int object for pread and pwrite */
	PyObject *admit_kwname;	/* ("admit",) for lookup */
	/* what the statistics records carry: Cmd.READ, Cmd.WRITE, Errno.OK */
	PyObject *read_op, *write_op, *ok;
	unsigned long long data_offset;	/* file offset of the data segment */
	unsigned long long export_size;
	unsigned long long iv_tweak;
	Py_ssize_t sector_size;
	unsigned long long iv_step;	/* plain64 units per sector */
	uint32_t max_payload;
	uint32_t cache_max_read;	/* larger reads do not fill the cache */
	int writable;
} Runner;

/* One request header as decoded from the wire. */
struct req_frame {
	uint16_t opcode;
	uint64_t handle, offset;
	uint32_t length;
	unsigned long long first_tweak;
};

static void req_dealloc(Runner *self)
{
	Py_XDECREF(self->pread);
	Py_XDECREF(self->pwrite);
	Py_XDECREF(self->lookup);
	Py_XDECREF(self->fill);
	Py_XDECREF(self->invalidate);
	Py_XDECREF(self->volume_id);
	Py_XDECREF(self->fd_arg);
	if (self->fd >= 0)
		close(self->fd);
	Py_XDECREF(self->admit_kwname);
	Py_XDECREF(self->read_op);
	Py_XDECREF(self->write_op);
	Py_XDECREF(self->ok);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *req_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {
		"key", "cache", "volume_id", "fd", "data_offset",
		"sector_size", "iv_tweak", "export_size", "max_payload",
		"writable", "cache_max_read", "read_op", "write_op", "ok",
		NULL
	};
	PyObject *key, *cache, *volume_id, *iv_tweak;
	PyObject *read_op, *write_op, *ok;
	unsigned long long data_offset, export_size;
	Py_ssize_t sector_size, max_payload, cache_max_read;
	int fd, writable;
	Runner *self;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "$OOO!iKnOKnpnOOO",
					 kwlist, &key, &cache, &PyLong_Type,
					 &volume_id, &fd,
					 &data_offset, &sector_size, &iv_tweak,
					 &export_size, &max_payload, &writable,
					 &cache_max_read, &read_op, &write_op,
					 &ok))
		return NULL;
	if (sector_size < REQ_IV_UNIT || NETBLK_BLOCK_SIZE % sector_size) {
		PyErr_Format(PyExc_ValueError,
			     "sector size %zd does not divide %d", sector_size,
			     NETBLK_BLOCK_SIZE);
		return NULL;
	}
	if (max_payload <= 0 || max_payload > NETBLK_MAX_PAYLOAD ||
	    cache_max_read < 0 || cache_max_read > UINT32_MAX) {
		PyErr_SetString(PyExc_ValueError,
				"max_payload or cache_max_read out of range");
		return NULL;
	}
	self = (Runner *)type->tp_alloc(type, 0);
	if (!self)
		return NULL;
	/* from here on dealloc closes fd unless it is -1 */
	self->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (self->fd < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		goto fail;
	}
	self->fd_arg = PyLong_FromLong(self->fd);
	if (!self->fd_arg)
		goto fail;
	self->iv_tweak = PyLong_AsUnsignedLongLong(iv_tweak);
	if (PyErr_Occurred())
		goto fail;
	self->pread = PyObject_GetAttrString(key, "pread");
	self->pwrite = PyObject_GetAttrString(key, "pwrite");
	self->lookup = PyObject_GetAttrString(cache, "lookup");
	self->fill = PyObject_GetAttrString(cache, "fill");
	self->invalidate = PyObject_GetAttrString(cache, "invalidate");
	self->admit_kwname = Py_BuildValue("(s)", "admit");
	if (!self->pread || !self->pwrite || !self->lookup || !self->fill ||
	    !self->invalidate || !self->admit_kwname)
		goto fail;
	self->volume_id = Py_NewRef(volume_id);
	self->read_op = Py_NewRef(read_op);
	self->write_op = Py_NewRef(write_op);
	self->ok = Py_NewRef(ok);
	self->data_offset = data_offset;
	self->export_size = export_size;
	self->sector_size = sector_size;
	self->iv_step = (unsigned long long)sector_size / REQ_IV_UNIT;
	self->max_payload = (uint32_t)max_payload;
	self->cache_max_read = (uint32_t)cache_max_read;
	self->writable = writable;
	return (PyObject *)self;

fail:
	Py_DECREF(self);
	return NULL;
}

/*
 * Decode the frame at @p (@avail bytes) into @frame if the runner takes it:
 * complete, a READ or WRITE with no flags that the codec would accept, its
 * handle not in @inflight, its plain64 tweaks in range.  Returns 1 if taken,
 * 0 if not, -1 with an exception set.
 */
static int req_decode(Runner *self, const unsigned char *p, Py_ssize_t avail,
		      PyObject *inflight, struct req_frame *frame)
{
	struct netblk_request hdr;
	unsigned long long first, span, last;
	PyObject *handle;
	int found;

	if (avail < (Py_ssize_t)sizeof(hdr))
		return 0;
	memcpy(&hdr, p, sizeof(hdr));
	if (be32toh(hdr.magic) != NETBLK_REQUEST_MAGIC || hdr.flags ||
	    hdr.reserved)
		return 0;
	frame->opcode = be16toh(hdr.opcode);
	frame->handle = be64toh(hdr.handle);
	frame->offset = be64toh(hdr.offset);
	frame->length = be32toh(hdr.length);
	switch (frame->opcode) {
	case NETBLK_CMD_WRITE:
		if (!self->writable ||
		    avail - (Py_ssize_t)sizeof(hdr) < frame->length)
			return 0;
		break;
	case NETBLK_CMD_READ:
		break;
	default:
		return 0;
	}
	if (!frame->length || frame->length > self->max_payload ||
	    frame->offset % NETBLK_BLOCK_SIZE ||
	    frame->length % NETBLK_BLOCK_SIZE ||
	    frame->offset > self->export_size ||
	    frame->length > self->export_size - frame->offset)
		return 0;
	/* the first sector's tweak, and the last unit's still in plain64:
	 * SectorCipher._first_tweak's first + sectors * step <= 2**64 */
	if (__builtin_add_overflow(frame->offset / REQ_IV_UNIT, self->iv_tweak,
				   &first) ||
	    __builtin_mul_overflow(frame->length / self->sector_size,
				   self->iv_step, &span) ||
	    __builtin_add_overflow(first, span - 1, &last))
		return 0;
	frame->first_tweak = first;
	handle = PyLong_FromUnsignedLongLong(frame->handle);
	if (!handle)
		return -1;
	found = PySet_Contains(inflight, handle);
	Py_DECREF(handle);
	return found < 0 ? -1 : !found;
}

/* A call's result, or NULL: an OSError is cleared and *@failed set, so the
 * frame is left to the codec; any other exception stays set. */
static PyObject *req_io(PyObject *result, int *failed)
{
	if (!result && PyErr_ExceptionMatches(PyExc_OSError)) {
		PyErr_Clear();
		*failed = 1;
	}
	return result;
}

/* The plaintext of a cache hit: the sectors' bytes joined. */
static PyObject *req_join(PyObject *sectors, Py_ssize_t length)
{
	PyObject *data;
	char *out;
	Py_ssize_t i, at = 0;

	if (!PyList_Check(sectors))
		goto wrong;
	data = PyBytes_FromStringAndSize(NULL, length);
	if (!data)
		return NULL;
	out = PyBytes_AS_STRING(data);
	for (i = 0; i < PyList_GET_SIZE(sectors); i++) {
		PyObject *sector = PyList_GET_ITEM(sectors, i);

		if (!PyBytes_Check(sector) ||
		    PyBytes_GET_SIZE(sector) > length - at)
			break;
		memcpy(out + at, PyBytes_AS_STRING(sector),
		       PyBytes_GET_SIZE(sector));
		at += PyBytes_GET_SIZE(sector);
	}
	if (at == length && i == PyList_GET_SIZE(sectors))
		return data;
	Py_DECREF(data);
wrong:
	PyErr_SetString(PyExc_SystemError,
			"cache lookup returned the wrong sectors");
	return NULL;
}

/*
 * A READ as Volume.read does it: the cache, else pread and maybe a fill.
 * Returns the plaintext and sets *@hit, or NULL (*@failed set if pread
 * failed, else an exception).
 */
static PyObject *req_read(Runner *self, const struct req_frame *frame,
			  int *hit, int *failed)
{
	Py_ssize_t sector = self->sector_size;
	PyObject *first, *count, *found, *admission, *data = NULL;

	first = PyLong_FromUnsignedLongLong(frame->offset / sector);
	count = PyLong_FromSsize_t(frame->length / sector);
	if (!first || !count)
		goto out;
	found = PyObject_Vectorcall(self->lookup, (PyObject *[]){
			self->volume_id, first, count,
			frame->length <= self->cache_max_read ?
				Py_True : Py_False },
			3, self->admit_kwname);
	if (!found)
		goto out;
	if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 2) {
		PyErr_SetString(PyExc_SystemError, "cache lookup: not a pair");
		goto drop_found;
	}
	if (PyTuple_GET_ITEM(found, 0) != Py_None) {
		*hit = 1;
		data = req_join(PyTuple_GET_ITEM(found, 0), frame->length);
		goto drop_found;
	}
	*hit = 0;
	data = req_io(PyObject_CallFunction(self->pread, "OKInKK", self->fd_arg,
					    self->data_offset + frame->offset,
					    frame->length, sector,
					    frame->first_tweak,
					    self->iv_step),
		      failed);
	admission = PyTuple_GET_ITEM(found, 1);
	if (data && admission != Py_None) {
		PyObject *filled = PyObject_Vectorcall(self->fill,
				(PyObject *[]){ self->volume_id, first, data,
						admission }, 4, NULL);

		if (filled)
			Py_DECREF(filled);
		else
			Py_CLEAR(data);
	}
drop_found:
	Py_DECREF(found);
out:
	Py_XDECREF(first);
	Py_XDECREF(count);
	return data;
}

/*
 * A WRITE as Volume.write does it without FUA: encrypt and write the
 * payload at @payload where it lies in the receive buffer, then drop the
 * sectors from the cache.  Returns 0, or -1 (*@failed set if pwrite failed,
 * else an exception).
 */
static int req_write(Runner *self, const struct req_frame *frame,
		     const unsigned char *payload, int *failed)
{
	Py_ssize_t sector = self->sector_size;
	PyObject *view, *done;

	/* No copy: run() holds the buffer exported, so it cannot be resized
	 * while pwrite reads it, and the view does not outlive this call. */
	view = PyMemoryView_FromMemory((char *)payload, frame->length,
				       PyBUF_READ);
	if (!view)
		return -1;
	done = req_io(PyObject_CallFunction(self->pwrite, "OKOnKK",
					    self->fd_arg,
					    self->data_offset + frame->offset,
					    view, sector, frame->first_tweak,
					    self->iv_step),
		      failed);
	Py_DECREF(view);
	if (!done)
		return -1;
	Py_DECREF(done);
	done = PyObject_CallFunction(self->invalidate, "OKI", self->volume_id,
				     (unsigned long long)(frame->offset /
							  sector),
				     (unsigned int)(frame->length / sector));
	if (!done)
		return -1;
	Py_DECREF(done);
	return 0;
}

static double req_clock(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)now.tv_sec + now.tv_nsec / 1e9;
}

/* Queue a request's reply header (and READ data) and its statistics
 * record, as Session._complete does.  Returns 0 or -1. */
static int req_answer(Runner *self, const struct req_frame *frame,
		      PyObject *data, int hit, double seconds,
		      PyObject *replies, PyObject *records)
{
	struct netblk_reply reply = {
		.magic = htobe32(NETBLK_REPLY_MAGIC),
		.error = 0,
		.handle = htobe64(frame->handle),
	};
	PyObject *header, *record;
	int err;

	header = PyBytes_FromStringAndSize((const char *)&reply,
					   sizeof(reply));
	if (!header)
		return -1;
	err = PyList_Append(replies, header);
	Py_DECREF(header);
	if (err || (data && PyList_Append(replies, data)))
		return -1;
	record = Py_BuildValue("(OIOOd)",
			       data ? self->read_op : self->write_op,
			       frame->length, self->ok,
			       !data ? Py_None : hit ? Py_True : Py_False,
			       seconds);
	if (!record)
		return -1;
	err = PyList_Append(records, record);
	Py_DECREF(record);
	return err;
}

PyDoc_STRVAR(req_run_doc,
"run(buffer, start, inflight, room, payload_room, replies, records)\n"
"    -> (consumed, taken, payload)\n\n"
"Run the leading READ and WRITE frames of bytearray buffer from offset\n"
"start that the codec would accept as requests without flags, and whose\n"
"handle is not in the set inflight: while fewer than room were taken and\n"
"their READ and WRITE lengths add up to at most payload_room.  Appends\n"
"each one's reply (header, then a READ's data) to replies and its\n"
"statistics record to records.  Stops at the first frame it does not\n"
"take, or whose file I/O fails, leaving it unconsumed.");

static PyObject *req_run(Runner *self, PyObject *args)
{
	PyObject *buffer, *inflight, *replies, *records, *result = NULL;
	Py_ssize_t start, room, payload_room, consumed = 0, taken = 0;
	long long payload = 0;
	Py_buffer held;

	if (!PyArg_ParseTuple(args, "O!nO!nnO!O!:run", &PyByteArray_Type,
			      &buffer, &start, &PySet_Type, &inflight, &room,
			      &payload_room, &PyList_Type, &replies,
			      &PyList_Type, &records))
		return NULL;
	/* Exported until the end: the bytes stay where they are (a resize
	 * raises BufferError) while calls below release the GIL. */
	if (PyObject_GetBuffer(buffer, &held, PyBUF_SIMPLE))
		return NULL;
	if (start < 0 || start > held.len) {
		PyErr_SetString(PyExc_ValueError, "start outside the buffer");
		goto release;
	}
	while (taken < room && payload <= payload_room) {
		const unsigned char *p = (const unsigned char *)held.buf +
					 start + consumed;
		struct req_frame frame;
		PyObject *data = NULL;
		int hit = 0, failed = 0, ok;
		double began;

		ok = req_decode(self, p, held.len - start - consumed, inflight,
				&frame);
		if (ok < 0)
			goto release;
		if (!ok)
			break;
		began = req_clock();
		if (frame.opcode == NETBLK_CMD_READ) {
			data = req_read(self, &frame, &hit, &failed);
			ok = data ? 0 : -1;
		} else {
			ok = req_write(self, &frame,
				       p + sizeof(struct netblk_request),
				       &failed);
		}
		if (failed)
			break;
		if (!ok)
			ok = req_answer(self, &frame, data, hit,
					req_clock() - began, replies, records);
		Py_XDECREF(data);
		if (ok)
			goto release;
		consumed += sizeof(struct netblk_request);
		if (frame.opcode == NETBLK_CMD_WRITE)
			consumed += frame.length;
		payload += frame.length;
		taken++;
	}
	result = Py_BuildValue("(nnL)", consumed, taken, payload);
release:
	PyBuffer_Release(&held);
	return result;
}

/* Latency buckets are powers of two of microseconds: 2**63 at most. */
#define REQ_MAX_BUCKETS 64
/* The opcodes linux/netblk.h defines. */
#define REQ_OPCODES (NETBLK_CMD_DISCONNECT + 1)
#define REQ_RECORD "a record is (op, length, error, cache_hit, seconds)"

/* What a batch of statistics records adds up to (tally()). */
struct req_tally {
	PyObject *op[REQ_OPCODES];	/* as the records name them */
	unsigned long long per_op[REQ_OPCODES];
	unsigned long long bytes_read, bytes_written, errors;
	unsigned long long cache_hits, cache_misses;
	unsigned long long count, total_us, max_us;
	unsigned long long buckets[REQ_MAX_BUCKETS];
	Py_ssize_t nbuckets;
};

/* A record's latency in microseconds, int(seconds * 1_000_000) or 1; or
 * -1 with an exception set. */
static long long req_micros(PyObject *seconds)
{
	double micros = PyFloat_AsDouble(seconds);

	if (micros == -1.0 && PyErr_Occurred())
		return -1;
	micros *= 1e6;
	/* also false for NaN */
	if (!(micros >= 0 && micros < 0x1p62)) {
		PyErr_SetString(PyExc_ValueError,
				"a latency is negative or out of range");
		return -1;
	}
	return (long long)micros ?: 1;
}

/* Count one (op, length, error, cache_hit, seconds) record into @t as
 * storaged.stats.IoCounters counts it.  Returns 0, or -1 with an
 * exception set. */
static int req_tally_one(struct req_tally *t, PyObject *record)
{
	unsigned long long length, micros;
	PyObject *op, *hit;
	long opcode;
	int failed, bucket;

	if (!PyTuple_Check(record) || PyTuple_GET_SIZE(record) != 5) {
		PyErr_SetString(PyExc_TypeError, REQ_RECORD);
		return -1;
	}
	op = PyTuple_GET_ITEM(record, 0);
	opcode = PyLong_AsLong(op);
	if (opcode == -1 && PyErr_Occurred())
		return -1;
	if (opcode < 0 || opcode >= REQ_OPCODES) {
		PyErr_Format(PyExc_ValueError, "no opcode %ld", opcode);
		return -1;
	}
	length = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(record, 1));
	if (length == (unsigned long long)-1 && PyErr_Occurred())
		return -1;
	failed = PyObject_IsTrue(PyTuple_GET_ITEM(record, 2));
	if (failed < 0)
		return -1;
	micros = (unsigned long long)req_micros(PyTuple_GET_ITEM(record, 4));
	if (micros == (unsigned long long)-1)
		return -1;
	Py_XSETREF(t->op[opcode], Py_NewRef(op));
	t->per_op[opcode]++;
	if (failed)
		t->errors++;	/* a failed request moved no bytes */
	else if (opcode == NETBLK_CMD_READ)
		t->bytes_read += length;
	else if (opcode == NETBLK_CMD_WRITE)
		t->bytes_written += length;
	hit = PyTuple_GET_ITEM(record, 3);
	if (hit == Py_True)
		t->cache_hits++;
	else if (hit == Py_False)
		t->cache_misses++;
	bucket = 63 - __builtin_clzll(micros);
	t->buckets[bucket < t->nbuckets ? bucket : t->nbuckets - 1]++;
	t->count++;
	t->total_us += micros;
	if (micros > t->max_us)
		t->max_us = micros;
	return 0;
}

/* @t's counts per op as a dict, its bucket counts added to @buckets (a
 * list of ints of @t->nbuckets); NULL with an exception on failure. */
static PyObject *req_tally_ops(const struct req_tally *t, PyObject *buckets)
{
	PyObject *ops = PyDict_New();
	Py_ssize_t i;

	if (!ops)
		return NULL;
	for (i = 0; i < REQ_OPCODES; i++) {
		PyObject *count;
		int err;

		if (!t->per_op[i])
			continue;
		count = PyLong_FromUnsignedLongLong(t->per_op[i]);
		if (!count)
			goto fail;
		err = PyDict_SetItem(ops, t->op[i], count);
		Py_DECREF(count);
		if (err)
			goto fail;
	}
	for (i = 0; i < t->nbuckets; i++) {
		PyObject *held, *sum;

		if (!t->buckets[i])
			continue;
		/* checked: hashing an op above may have run code; an exact
		 * int adds without running any */
		held = PyList_GetItem(buckets, i);
		if (!held)
			goto fail;
		if (!PyLong_CheckExact(held)) {
			PyErr_SetString(PyExc_TypeError,
					"a bucket is not an int");
			goto fail;
		}
		sum = PyLong_FromUnsignedLongLong(t->buckets[i]);
		if (sum)
			Py_SETREF(sum, PyNumber_Add(held, sum));
		if (!sum || PyList_SetItem(buckets, i, sum))
			goto fail;
	}
	return ops;

fail:
	Py_DECREF(ops);
	return NULL;
}

PyDoc_STRVAR(req_tally_doc,
"tally(records, buckets, /) -> (requests, bytes_read, bytes_written,\n"
"    errors, cache_hits, cache_misses, count, total_us, max_us)\n\n"
"Sum a batch of statistics records (op, length, error, cache_hit, seconds)\n"
"in one pass: requests maps each op to its count; a failed request (error\n"
"true) moves no bytes; cache_hit None means the cache was not asked.  Each\n"
"latency, int(seconds * 1_000_000) or 1 microseconds, is counted in the\n"
"list buckets, updated in place: bucket i holds [2**i, 2**(i+1)) us, the\n"
"last one everything above.");

static PyObject *req_tally(PyObject *Py_UNUSED(module), PyObject *args)
{
	struct req_tally t = { 0 };
	PyObject *records, *buckets, *ops = NULL;
	Py_ssize_t i;

	if (!PyArg_ParseTuple(args, "O!O!:tally", &PyList_Type, &records,
			      &PyList_Type, &buckets))
		return NULL;
	t.nbuckets = PyList_GET_SIZE(buckets);
	if (t.nbuckets < 1 || t.nbuckets > REQ_MAX_BUCKETS) {
		PyErr_Format(PyExc_ValueError, "%zd buckets: 1 to %d",
			     t.nbuckets, REQ_MAX_BUCKETS);
		return NULL;
	}
	for (i = 0; i < PyList_GET_SIZE(records); i++) {
		/* held: a conversion below may run code that edits the list */
		PyObject *record = Py_NewRef(PyList_GET_ITEM(records, i));
		int err = req_tally_one(&t, record);

		Py_DECREF(record);
		if (err)
			goto drop_ops;
	}
	ops = req_tally_ops(&t, buckets);
drop_ops:
	for (i = 0; i < REQ_OPCODES; i++)
		Py_XDECREF(t.op[i]);
	if (!ops)
		return NULL;
	return Py_BuildValue("(NKKKKKKKK)", ops, t.bytes_read,
			     t.bytes_written, t.errors, t.cache_hits,
			     t.cache_misses, t.count, t.total_us, t.max_us);
}

static PyMethodDef req_methods[] = {
	{ "run", (PyCFunction)req_run, METH_VARARGS, req_run_doc },
	{ NULL, NULL, 0, NULL },
};

PyDoc_STRVAR(req_doc,
"Runner(*, key, cache, volume_id, fd, data_offset, sector_size, iv_tweak,\n"
"       export_size, max_payload, writable, cache_max_read, read_op,\n"
"       write_op, ok)\n\n"
"Runs a connection's plain READs and WRITEs on one volume "
"(storaged.volume.Volume.runner makes it).");

static PyTypeObject req_runner_type = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "storaged._requests.Runner",
	.tp_doc = req_doc,
	.tp_basicsize = sizeof(Runner),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = req_new,
	.tp_dealloc = (destructor)req_dealloc,
	.tp_methods = req_methods,
};

static PyMethodDef req_module_functions[] = {
	{ "tally", req_tally, METH_VARARGS, req_tally_doc },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef req_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "storaged._requests",
	.m_doc = "A connection's plain READs and WRITEs, and their statistics, "
		 "in C.",
	.m_size = -1,
	.m_methods = req_module_functions,
};

PyMODINIT_FUNC PyInit__requests(void)
{
	PyObject *module;

	/* the wire structs as docs/protocol.md lays them out */
	Py_BUILD_ASSERT(sizeof(struct netblk_request) == 32);
	Py_BUILD_ASSERT(sizeof(struct netblk_reply) == 16);
	if (PyType_Ready(&req_runner_type) < 0)
		return NULL;
	module = PyModule_Create(&req_module);
	if (!module)
		return NULL;
	if (PyModule_AddObjectRef(module, "Runner",
				  (PyObject *)&req_runner_type)) {
		Py_DECREF(module);
		return NULL;
	}
	return module;
}
