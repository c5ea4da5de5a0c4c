// SPDX-License-Identifier: GPL-2.0
/*
 * Request framing and validation: the one place that decides what a
 * request frame means (docs/protocol.md, "Requests").  The Python codec
 * (netblk.protocol.codec) asks Scanner.scan() for its events, the engine's
 * run() scans with eng_frame_scan() directly; tests hold both to the
 * Python oracle in tests/storaged/oracle.py.
 */
#include "engine.h"

#include <endian.h>
#include <stdio.h>
#include <string.h>

/* Flags each opcode may carry; anything else is EINVAL. */
static const uint16_t frame_allowed_flags[ENG_OPCODES] = {
	[NETBLK_CMD_WRITE] = NETBLK_CMD_FLAG_FUA,
	[NETBLK_CMD_TRIM] = NETBLK_CMD_FLAG_FUA,
	[NETBLK_CMD_WRITE_ZEROES] = NETBLK_CMD_FLAG_FUA | NETBLK_CMD_FLAG_NO_HOLE,
};

/* The export flag an opcode needs, or it is ENOTSUP. */
static const uint32_t frame_required_export_flag[ENG_OPCODES] = {
	[NETBLK_CMD_FLUSH] = NETBLK_EXPORT_SEND_FLUSH,
	[NETBLK_CMD_TRIM] = NETBLK_EXPORT_SEND_TRIM,
	[NETBLK_CMD_WRITE_ZEROES] = NETBLK_EXPORT_SEND_WRITE_ZEROES,
};

static const char *const frame_names[ENG_OPCODES] = {
	[NETBLK_CMD_READ] = "READ",
	[NETBLK_CMD_WRITE] = "WRITE",
	[NETBLK_CMD_FLUSH] = "FLUSH",
	[NETBLK_CMD_TRIM] = "TRIM",
	[NETBLK_CMD_WRITE_ZEROES] = "WRITE_ZEROES",
	[NETBLK_CMD_DISCONNECT] = "DISCONNECT",
};

/* Whether an opcode's length addresses a range of the export. */
bool eng_frame_ranged(uint16_t opcode)
{
	return opcode == NETBLK_CMD_READ || eng_frame_mutating(opcode);
}

/* Whether an opcode changes data (EPERM on a read-only export). */
bool eng_frame_mutating(uint16_t opcode)
{
	return opcode == NETBLK_CMD_WRITE || opcode == NETBLK_CMD_TRIM ||
	       opcode == NETBLK_CMD_WRITE_ZEROES;
}

/* ---- the in-flight handle set ---------------------------------------- */

#define HANDLES_MIN_SLOTS 64

static size_t handles_home(const struct eng_handles *set, uint64_t handle)
{
	/* Fibonacci hashing: a driver's handles differ in their low bits */
	return (size_t)((handle * 0x9E3779B97F4A7C15ull) >> 32) & set->mask;
}

static bool handles_contains(const struct eng_handles *set, uint64_t handle)
{
	size_t slot;

	if (!set->count)
		return false;
	for (slot = handles_home(set, handle); set->used[slot];
	     slot = (slot + 1) & set->mask)
		if (set->keys[slot] == handle)
			return true;
	return false;
}

static int handles_resize(struct eng_handles *set, size_t slots)
{
	struct eng_handles grown = { .mask = slots - 1 };
	size_t i, slot;

	grown.keys = PyMem_Calloc(slots, sizeof(*grown.keys));
	grown.used = PyMem_Calloc(slots, sizeof(*grown.used));
	if (!grown.keys || !grown.used) {
		PyMem_Free(grown.keys);
		PyMem_Free(grown.used);
		PyErr_NoMemory();
		return -1;
	}
	for (i = 0; set->keys && i <= set->mask; i++) {
		if (!set->used[i])
			continue;
		for (slot = handles_home(&grown, set->keys[i]);
		     grown.used[slot]; slot = (slot + 1) & grown.mask)
			;
		grown.keys[slot] = set->keys[i];
		grown.used[slot] = 1;
		grown.count++;
	}
	PyMem_Free(set->keys);
	PyMem_Free(set->used);
	*set = grown;
	return 0;
}

/* Record @handle as in flight (not there yet).  Returns 0 or -1 with
 * MemoryError set. */
int eng_handles_add(struct eng_handles *set, uint64_t handle)
{
	size_t slot;

	/* at most half full keeps probes short */
	if (!set->keys || 2 * (set->count + 1) > set->mask + 1) {
		size_t slots = set->keys ? 2 * (set->mask + 1) :
					   HANDLES_MIN_SLOTS;

		if (handles_resize(set, slots))
			return -1;
	}
	for (slot = handles_home(set, handle); set->used[slot];
	     slot = (slot + 1) & set->mask)
		;
	set->keys[slot] = handle;
	set->used[slot] = 1;
	set->count++;
	return 0;
}

/* Forget @handle (its reply is out); backward-shift deletion keeps every
 * probe sequence unbroken without tombstones. */
void eng_handles_remove(struct eng_handles *set, uint64_t handle)
{
	size_t hole, slot, home;

	if (!set->count)
		return;
	for (hole = handles_home(set, handle); set->used[hole];
	     hole = (hole + 1) & set->mask)
		if (set->keys[hole] == handle)
			break;
	if (!set->used[hole])
		return;
	set->used[hole] = 0;
	set->count--;
	for (slot = (hole + 1) & set->mask; set->used[slot];
	     slot = (slot + 1) & set->mask) {
		home = handles_home(set, set->keys[slot]);
		/* move it back unless its home lies cyclically in
		 * (hole, slot] */
		if (((slot - home) & set->mask) < ((slot - hole) & set->mask))
			continue;
		set->keys[hole] = set->keys[slot];
		set->used[hole] = 1;
		set->used[slot] = 0;
		hole = slot;
	}
}

static void handles_free(struct eng_handles *set)
{
	PyMem_Free(set->keys);
	PyMem_Free(set->used);
	memset(set, 0, sizeof(*set));
}

/* ---- frames ----------------------------------------------------------- */

/* A reply header for @handle with @error (NETBLK_E*), at @out. */
void eng_reply_header(unsigned char *out, uint64_t handle, uint32_t error)
{
	struct netblk_reply reply = {
		.magic = htobe32(NETBLK_REPLY_MAGIC),
		.error = htobe32(error),
		.handle = htobe64(handle),
	};

	memcpy(out, &reply, sizeof(reply));
}

static void frame_refuse(struct eng_frame *frame, enum eng_frame_kind kind,
			 uint32_t error, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static void frame_refuse(struct eng_frame *frame, enum eng_frame_kind kind,
			 uint32_t error, const char *fmt, ...)
{
	va_list args;

	frame->kind = kind;
	frame->error = error;
	va_start(args, fmt);
	vsnprintf(frame->reason, sizeof(frame->reason), fmt, args);
	va_end(args);
}

/* Why a well-framed request must be refused: sets ->kind INVALID, or
 * leaves it. */
static void frame_check(const struct eng_geometry *geo,
			struct eng_frame *frame, uint32_t reserved)
{
	uint16_t op = frame->opcode;
	uint64_t offset = frame->offset, length = frame->length;
	const char *name;

	if (op >= ENG_OPCODES) {
		frame_refuse(frame, ENG_FRAME_INVALID, NETBLK_EINVAL,
			     "unknown opcode %u", op);
		return;
	}
	name = frame_names[op];
	if (reserved) {
		frame_refuse(frame, ENG_FRAME_INVALID, NETBLK_EINVAL,
			     "non-zero reserved field");
	} else if (frame->flags & ~frame_allowed_flags[op]) {
		frame_refuse(frame, ENG_FRAME_INVALID, NETBLK_EINVAL,
			     "flags 0x%x not valid for %s", frame->flags, name);
	} else if (frame_required_export_flag[op] &&
		   !(geo->export_flags & frame_required_export_flag[op])) {
		frame_refuse(frame, ENG_FRAME_INVALID, NETBLK_ENOTSUP,
			     "export does not offer %s", name);
	} else if (eng_frame_mutating(op) &&
		   geo->export_flags & NETBLK_EXPORT_READ_ONLY) {
		frame_refuse(frame, ENG_FRAME_INVALID, NETBLK_EPERM,
			     "%s on a read-only export", name);
	} else if (!eng_frame_ranged(op)) {
		if (offset || length)
			frame_refuse(frame, ENG_FRAME_INVALID, NETBLK_EINVAL,
				     "%s with offset or length", name);
	} else if (!length || offset % NETBLK_BLOCK_SIZE ||
		   length % NETBLK_BLOCK_SIZE) {
		frame_refuse(frame, ENG_FRAME_INVALID, NETBLK_EINVAL,
			     "range %llu+%llu is empty or not %d-aligned",
			     (unsigned long long)offset,
			     (unsigned long long)length, NETBLK_BLOCK_SIZE);
	} else if (op == NETBLK_CMD_READ && length > geo->max_payload) {
		frame_refuse(frame, ENG_FRAME_INVALID, NETBLK_EOVERFLOW,
			     "READ of %llu bytes exceeds max payload",
			     (unsigned long long)length);
	} else if (offset > geo->size || length > geo->size - offset) {
		frame_refuse(frame, ENG_FRAME_INVALID,
			     op == NETBLK_CMD_WRITE ||
			     op == NETBLK_CMD_WRITE_ZEROES ?
				NETBLK_ENOSPC : NETBLK_EINVAL,
			     "range %llu+%llu beyond export size %llu",
			     (unsigned long long)offset,
			     (unsigned long long)length,
			     (unsigned long long)geo->size);
	}
}

/**
 * eng_frame_scan - decode and check the request frame at @p
 * @scanner: the connection's geometry and in-flight handles (only read)
 * @p: the frame's first byte
 * @avail: bytes from @p on that have arrived
 * @frame: filled in; ->kind says what the frame is
 *
 * In the order docs/protocol.md gives: a bad magic, a WRITE longer than
 * the max payload and a handle already in flight break the stream
 * (ENG_FRAME_BROKEN); a frame not yet whole is ENG_FRAME_SHORT; a whole
 * one is checked against the export.  Nothing is consumed or recorded:
 * the caller takes the frame (->size bytes) and adds its handle.
 */
void eng_frame_scan(const EngScanner *scanner, unsigned char *p,
		    size_t avail, struct eng_frame *frame)
{
	struct netblk_request hdr;

	frame->kind = ENG_FRAME_SHORT;
	frame->error = NETBLK_EOK;
	frame->reason[0] = '\0';
	frame->payload = NULL;
	if (avail < sizeof(hdr))
		return;
	memcpy(&hdr, p, sizeof(hdr));
	frame->opcode = be16toh(hdr.opcode);
	frame->flags = be16toh(hdr.flags);
	frame->handle = be64toh(hdr.handle);
	frame->offset = be64toh(hdr.offset);
	frame->length = be32toh(hdr.length);
	frame->size = sizeof(hdr);
	if (be32toh(hdr.magic) != NETBLK_REQUEST_MAGIC) {
		frame_refuse(frame, ENG_FRAME_BROKEN, NETBLK_EOK,
			     "bad request magic 0x%08x", be32toh(hdr.magic));
		return;
	}
	if (frame->opcode == NETBLK_CMD_WRITE) {
		if (frame->length > scanner->geometry.max_payload) {
			frame_refuse(frame, ENG_FRAME_BROKEN, NETBLK_EOK,
				     "WRITE of %u bytes exceeds max payload",
				     frame->length);
			return;
		}
		if (avail - sizeof(hdr) < frame->length)
			return;
		frame->payload = p + sizeof(hdr);
		frame->size += frame->length;
	}
	if (handles_contains(&scanner->inflight, frame->handle)) {
		frame_refuse(frame, ENG_FRAME_BROKEN, NETBLK_EOK,
			     "handle 0x%llx is already in flight",
			     (unsigned long long)frame->handle);
		return;
	}
	frame->kind = ENG_FRAME_REQUEST;
	frame_check(&scanner->geometry, frame, be32toh(hdr.reserved));
	if (frame->kind == ENG_FRAME_REQUEST &&
	    frame->opcode == NETBLK_CMD_DISCONNECT)
		frame->kind = ENG_FRAME_DISCONNECT;
}

/* ---- the Scanner type ------------------------------------------------- */

static PyObject *scanner_new(PyTypeObject *type, PyObject *args,
			     PyObject *kwds)
{
	static char *kwlist[] = { "size", "export_flags", "max_payload", NULL };
	unsigned long long size;
	unsigned int export_flags, max_payload;
	EngScanner *self;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "$KII:Scanner", kwlist,
					 &size, &export_flags, &max_payload))
		return NULL;
	if (!max_payload || max_payload > NETBLK_MAX_PAYLOAD) {
		PyErr_Format(PyExc_ValueError,
			     "max_payload %u is not 1..%d", max_payload,
			     NETBLK_MAX_PAYLOAD);
		return NULL;
	}
	self = (EngScanner *)type->tp_alloc(type, 0);
	if (!self)
		return NULL;
	self->geometry.size = size;
	self->geometry.export_flags = export_flags;
	self->geometry.max_payload = max_payload;
	return (PyObject *)self;
}

static void scanner_dealloc(EngScanner *self)
{
	handles_free(&self->inflight);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(scanner_scan_doc,
"scan(buffer, start, /) -> (kind, size, opcode, flags, handle, offset,\n"
"    length, error, reason)\n\n"
"Decode and check the request frame at offset start of bytearray buffer.\n"
"kind is one of the FRAME_* constants; a REQUEST or INVALID frame's handle\n"
"is in flight from now until answer().  Nothing is consumed: the frame\n"
"takes size bytes (a WRITE's payload follows its 32-byte header).");

static PyObject *scanner_scan(EngScanner *self, PyObject *const *args,
			      Py_ssize_t nargs)
{
	struct eng_frame frame;
	Py_ssize_t start;
	Py_buffer held;

	if (nargs != 2 || !PyByteArray_Check(args[0])) {
		PyErr_SetString(PyExc_TypeError, "scan(buffer, start)");
		return NULL;
	}
	start = PyLong_AsSsize_t(args[1]);
	if (start == -1 && PyErr_Occurred())
		return NULL;
	if (PyObject_GetBuffer(args[0], &held, PyBUF_SIMPLE))
		return NULL;
	if (start < 0 || start > held.len) {
		PyBuffer_Release(&held);
		PyErr_SetString(PyExc_ValueError, "start outside the buffer");
		return NULL;
	}
	eng_frame_scan(self, (unsigned char *)held.buf + start,
		       (size_t)(held.len - start), &frame);
	PyBuffer_Release(&held);
	if ((frame.kind == ENG_FRAME_REQUEST ||
	     frame.kind == ENG_FRAME_INVALID) &&
	    eng_handles_add(&self->inflight, frame.handle))
		return NULL;
	return Py_BuildValue("(inHHKKIIs)", (int)frame.kind,
			     (Py_ssize_t)frame.size, frame.opcode,
			     frame.flags, (unsigned long long)frame.handle,
			     (unsigned long long)frame.offset, frame.length,
			     frame.error, frame.reason);
}

PyDoc_STRVAR(scanner_answer_doc,
"answer(handle, error, /) -> bytes\n\n"
"The reply header for handle with error (a NETBLK_E* errno); the handle\n"
"is no longer in flight.");

static PyObject *scanner_answer(EngScanner *self, PyObject *const *args,
				Py_ssize_t nargs)
{
	unsigned char header[sizeof(struct netblk_reply)];
	unsigned long long handle;
	unsigned long error;

	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, "answer(handle, error)");
		return NULL;
	}
	handle = PyLong_AsUnsignedLongLong(args[0]);
	if (handle == (unsigned long long)-1 && PyErr_Occurred())
		return NULL;
	error = PyLong_AsUnsignedLong(args[1]);
	if (error == (unsigned long)-1 && PyErr_Occurred())
		return NULL;
	if (error > UINT32_MAX) {
		PyErr_SetString(PyExc_OverflowError, "error out of range");
		return NULL;
	}
	eng_handles_remove(&self->inflight, handle);
	eng_reply_header(header, handle, (uint32_t)error);
	return PyBytes_FromStringAndSize((const char *)header, sizeof(header));
}

static PyObject *scanner_inflight(EngScanner *self, void *Py_UNUSED(closure))
{
	return PyLong_FromSize_t(self->inflight.count);
}

static PyMethodDef scanner_methods[] = {
	{ "scan", (PyCFunction)(void (*)(void))scanner_scan, METH_FASTCALL,
	  scanner_scan_doc },
	{ "answer", (PyCFunction)(void (*)(void))scanner_answer,
	  METH_FASTCALL, scanner_answer_doc },
	{ NULL },
};

static PyGetSetDef scanner_getset[] = {
	{ "inflight", (getter)scanner_inflight, NULL,
	  "requests scanned and not yet answered", NULL },
	{ NULL },
};

PyTypeObject eng_scanner_type = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "storaged._engine.Scanner",
	.tp_doc = "Scanner(*, size, export_flags, max_payload)\n\n"
		  "A connection's request frames, checked against what its "
		  "client was admitted to.",
	.tp_basicsize = sizeof(EngScanner),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = scanner_new,
	.tp_dealloc = (destructor)scanner_dealloc,
	.tp_methods = scanner_methods,
	.tp_getset = scanner_getset,
};
