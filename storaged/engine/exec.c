// SPDX-License-Identifier: GPL-2.0
/*
 * A batch of requests, run against a volume: the one request path.
 *
 * run() takes the frames at the front of a connection's receive buffer
 * and answers them as a batch, in three steps:
 *
 *  1. With the GIL: scan frames (frame.c) until the batch is full (room
 *     requests, or payload_room bytes of READ and WRITE payload), a frame
 *     is not whole, or one ends the batch: a FLUSH (left to the worker
 *     pool: an fdatasync may take long, the requests behind it need not
 *     wait, and it covers every write before it, all of them done by
 *     then), a DISCONNECT, a broken frame, or a request whose range
 *     overlaps one in the batch where either of them writes (so the store
 *     may run a batch's operations in any order).  Refused frames are
 *     answered in place.  The reply is allocated whole: a READ's data is
 *     read straight into it.
 *  2. Without the GIL: encrypt every WRITE in place in the receive buffer
 *     (its bytes are consumed anyway), submit the batch's operations to
 *     the store and wait for all of them, zero the WRITE_ZEROES that keep
 *     their allocation (NO_HOLE) by writing encrypted zeros, flush once
 *     for the batch's FUA requests, decrypt every READ in place.
 *  3. With the GIL: write the reply headers (closing the gaps of READs
 *     that failed), count every request, let go of the handles.
 *
 * A request's latency is from the start of its batch until the batch's
 * replies are ready.  Store failures become replies (ENOSPC where the
 * store ran out of space, else EIO) and notes for the log; nothing is ever
 * run twice.
 */
#include "engine.h"

#include <errno.h>
#include <string.h>
#include <time.h>

/* WRITE_ZEROES with NO_HOLE encrypts zeros in chunks of this size. */
#define EXEC_ZERO_CHUNK (1 << 20)

/* One request of a batch. */
struct exec_req {
	struct eng_frame frame;
	size_t reply;		/* its reply header's offset in the reply */
	struct eng_io *io;	/* its store operation, if it has one */
	uint32_t error;		/* NETBLK_E* it is answered with */
	int io_error;		/* the store's errno, for the log */
};

struct exec_batch {
	EngScanner *scanner;
	EngVolume *volume;
	EngCounters *counters;
	unsigned char *in;	/* the receive buffer from the start */
	size_t avail;
	struct exec_req *reqs;
	size_t count;		/* taken, refused ones included */
	struct eng_io *ios;
	size_t nios;
	size_t consumed;
	uint64_t payload;	/* READ and WRITE bytes taken */
	enum eng_stop stop;
	struct eng_frame last;	/* the frame that stopped it */
	PyObject *reply;	/* bytes */
	size_t reply_size;
	bool decrypts;		/* a READ: needs the decrypting context */
	bool encrypts;		/* a WRITE, or zeros kept allocated */
	double began;
};

static double exec_clock(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

/* The reply error for a store's errno. */
static uint32_t exec_wire_error(int err)
{
	return err == ENOSPC || err == EDQUOT ? NETBLK_ENOSPC : NETBLK_EIO;
}

/* Whether @f overlaps a request of @b where either of them writes. */
static bool exec_conflicts(const struct exec_batch *b,
			   const struct eng_frame *f)
{
	size_t i;

	if (!eng_frame_ranged(f->opcode))
		return false;
	for (i = 0; i < b->count; i++) {
		const struct eng_frame *r = &b->reqs[i].frame;

		if (r->kind != ENG_FRAME_REQUEST ||
		    !eng_frame_ranged(r->opcode) ||
		    (!eng_frame_mutating(f->opcode) &&
		     !eng_frame_mutating(r->opcode)))
			continue;
		if (f->offset < r->offset + r->length &&
		    r->offset < f->offset + f->length)
			return true;
	}
	return false;
}

/* Step 1: take frames into @b.  Returns 0, or -1 with an exception set
 * (every handle it added is let go again). */
static int exec_scan(struct exec_batch *b, size_t room, uint64_t payload_room)
{
	struct eng_frame *f = &b->last;
	size_t i;

	b->stop = ENG_STOP_FULL;
	while (b->count < room && b->payload <= payload_room) {
		eng_frame_scan(b->scanner, b->in + b->consumed,
			       b->avail - b->consumed, f);
		if (f->kind == ENG_FRAME_SHORT) {
			b->stop = ENG_STOP_SHORT;
			break;
		}
		if (f->kind == ENG_FRAME_BROKEN) {
			b->stop = ENG_STOP_BROKEN;
			break;
		}
		if (f->kind == ENG_FRAME_DISCONNECT) {
			b->consumed += f->size;
			b->stop = ENG_STOP_DISCONNECT;
			break;
		}
		if (f->kind == ENG_FRAME_REQUEST && exec_conflicts(b, f))
			break;
		if (eng_handles_add(&b->scanner->inflight, f->handle))
			goto undo;
		b->consumed += f->size;
		if (f->kind == ENG_FRAME_REQUEST &&
		    f->opcode == NETBLK_CMD_FLUSH) {
			b->stop = ENG_STOP_FLUSH;
			break;
		}
		b->reqs[b->count++].frame = *f;
		if (f->kind == ENG_FRAME_REQUEST &&
		    (f->opcode == NETBLK_CMD_READ ||
		     f->opcode == NETBLK_CMD_WRITE))
			b->payload += f->length;
	}
	return 0;

undo:
	for (i = 0; i < b->count; i++)
		eng_handles_remove(&b->scanner->inflight,
				   b->reqs[i].frame.handle);
	return -1;
}

/* Lay out the reply and the store operations of @b's requests, and note
 * which cipher contexts they need.  Returns 0, or -1 with an exception
 * set. */
static int exec_prepare(struct exec_batch *b)
{
	EngVolume *volume = b->volume;
	size_t i, at = 0;

	for (i = 0; i < b->count; i++) {
		const struct eng_frame *f = &b->reqs[i].frame;

		b->reqs[i].reply = at;
		at += sizeof(struct netblk_reply);
		if (f->kind == ENG_FRAME_REQUEST && f->opcode == NETBLK_CMD_READ)
			at += f->length;
	}
	b->reply = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)at);
	if (!b->reply)
		return -1;
	b->reply_size = at;
	b->ios = PyMem_Calloc(b->count ? b->count : 1, sizeof(*b->ios));
	if (!b->ios)
		return PyErr_NoMemory(), -1;
	for (i = 0; i < b->count; i++) {
		struct exec_req *req = &b->reqs[i];
		const struct eng_frame *f = &req->frame;
		struct eng_io *io = &b->ios[b->nios];

		req->error = f->error;
		if (f->kind != ENG_FRAME_REQUEST)
			continue;
		b->decrypts |= f->opcode == NETBLK_CMD_READ;
		b->encrypts |= f->opcode == NETBLK_CMD_WRITE ||
			       (f->opcode == NETBLK_CMD_WRITE_ZEROES &&
				f->flags & NETBLK_CMD_FLAG_NO_HOLE);
		io->offset = volume->data_offset + f->offset;
		io->length = f->length;
		switch (f->opcode) {
		case NETBLK_CMD_READ:
			io->op = ENG_IO_READ;
			io->buf = (unsigned char *)PyBytes_AS_STRING(b->reply) +
				  req->reply + sizeof(struct netblk_reply);
			break;
		case NETBLK_CMD_WRITE:
			io->op = ENG_IO_WRITE;
			io->buf = f->payload;
			break;
		case NETBLK_CMD_TRIM:
			io->op = ENG_IO_DISCARD;
			break;
		case NETBLK_CMD_WRITE_ZEROES:
			if (f->flags & NETBLK_CMD_FLAG_NO_HOLE)
				continue;	/* exec_zero_allocated() */
			io->op = ENG_IO_WRITE_ZEROES;
			break;
		}
		req->io = io;
		b->nios++;
	}
	return 0;
}

/* Write encrypted zeros over a NO_HOLE WRITE_ZEROES, a chunk at a time;
 * returns 0 or an errno (ENOMEM, EIO for a refused cipher, the store's). */
static int exec_zero_allocated(struct exec_batch *b, EVP_CIPHER_CTX *enc,
			       const struct eng_frame *f)
{
	EngVolume *volume = b->volume;
	struct eng_io io = { .op = ENG_IO_WRITE };
	uint64_t done, chunk;
	unsigned char *zeros;
	int err = 0;

	zeros = PyMem_RawMalloc(EXEC_ZERO_CHUNK);
	if (!zeros)
		return ENOMEM;
	for (done = 0; done < f->length && !err; done += chunk) {
		chunk = f->length - done;
		if (chunk > EXEC_ZERO_CHUNK)
			chunk = EXEC_ZERO_CHUNK;
		memset(zeros, 0, chunk);
		if (eng_xts_run(enc, zeros, chunk, volume->sector_size,
				eng_volume_tweak(volume, f->offset + done),
				volume->sector_size / ENG_IV_UNIT, 1, false)) {
			err = EIO;
			break;
		}
		io.offset = volume->data_offset + f->offset + done;
		io.length = chunk;
		io.buf = zeros;
		eng_store_run(volume->store->store, &io, 1);
		err = io.error;
	}
	PyMem_RawFree(zeros);
	return err;
}

/* Step 2, without the GIL: the batch's I/O and crypto.  @enc and @dec are
 * contexts (or NULL where the batch needs none); *@cipher_failed is set
 * if OpenSSL refused a unit. */
static void exec_io(struct exec_batch *b, EVP_CIPHER_CTX *enc,
		    EVP_CIPHER_CTX *dec, bool *cipher_failed)
{
	EngVolume *volume = b->volume;
	uint64_t step = volume->sector_size / ENG_IV_UNIT;
	struct eng_io flush = { .op = ENG_IO_FLUSH };
	bool fua = false;
	size_t i;

	for (i = 0; i < b->count; i++) {
		struct exec_req *req = &b->reqs[i];
		const struct eng_frame *f = &req->frame;

		if (f->kind != ENG_FRAME_REQUEST ||
		    f->opcode != NETBLK_CMD_WRITE)
			continue;
		if (eng_xts_run(enc, f->payload, f->length, volume->sector_size,
				eng_volume_tweak(volume, f->offset), step, 1,
				false)) {
			*cipher_failed = true;
			return;
		}
	}
	eng_store_run(volume->store->store, b->ios, b->nios);
	for (i = 0; i < b->count; i++) {
		struct exec_req *req = &b->reqs[i];
		const struct eng_frame *f = &req->frame;

		if (f->kind != ENG_FRAME_REQUEST)
			continue;
		if (req->io)
			req->io_error = req->io->error;
		else if (f->opcode == NETBLK_CMD_WRITE_ZEROES)
			req->io_error = exec_zero_allocated(b, enc, f);
		if (!req->io_error && f->flags & NETBLK_CMD_FLAG_FUA)
			fua = true;
	}
	if (fua)
		eng_store_run(volume->store->store, &flush, 1);
	for (i = 0; i < b->count; i++) {
		struct exec_req *req = &b->reqs[i];
		const struct eng_frame *f = &req->frame;

		if (f->kind != ENG_FRAME_REQUEST)
			continue;
		if (!req->io_error && f->flags & NETBLK_CMD_FLAG_FUA)
			req->io_error = flush.error;
		if (req->io_error) {
			req->error = exec_wire_error(req->io_error);
			continue;
		}
		if (f->opcode == NETBLK_CMD_READ &&
		    eng_xts_run(dec, req->io->buf, f->length,
				volume->sector_size,
				eng_volume_tweak(volume, f->offset), step, 0,
				true)) {
			*cipher_failed = true;
			return;
		}
	}
}

/* Step 3: reply headers, closing the gap of each failed READ; shrinks the
 * reply to fit.  Returns 0, or -1 with an exception set. */
static int exec_answer(struct exec_batch *b)
{
	unsigned char *out = (unsigned char *)PyBytes_AS_STRING(b->reply);
	size_t i, at = 0;

	for (i = 0; i < b->count; i++) {
		struct exec_req *req = &b->reqs[i];
		const struct eng_frame *f = &req->frame;

		eng_reply_header(out + at, f->handle, req->error);
		at += sizeof(struct netblk_reply);
		if (f->kind != ENG_FRAME_REQUEST ||
		    f->opcode != NETBLK_CMD_READ || req->error)
			continue;
		if (at != req->reply + sizeof(struct netblk_reply))
			memmove(out + at,
				out + req->reply + sizeof(struct netblk_reply),
				f->length);
		at += f->length;
	}
	if (at == b->reply_size)
		return 0;
	b->reply_size = at;
	return _PyBytes_Resize(&b->reply, (Py_ssize_t)at);
}

/* A note for the log: (event, handle, opcode, offset, length, error,
 * reason); NULL with an exception set. */
static PyObject *exec_note(const char *event, const struct eng_frame *f,
			   uint32_t error, const char *reason)
{
	return Py_BuildValue("(sKHKIIs)", event,
			     (unsigned long long)f->handle, f->opcode,
			     (unsigned long long)f->offset, f->length, error,
			     reason);
}

/* Append exec_note()'s note to @notes; 0, or -1 with an exception set. */
static int exec_add_note(PyObject *notes, const char *event,
			 const struct eng_frame *f, uint32_t error,
			 const char *reason)
{
	PyObject *note = exec_note(event, f, error, reason);
	int err;

	if (!note)
		return -1;
	err = PyList_Append(notes, note);
	Py_DECREF(note);
	return err;
}

/* Count the batch, let go of its handles and note what the log must say.
 * Returns the notes, or NULL with an exception set. */
static PyObject *exec_settle(struct exec_batch *b, double seconds)
{
	PyObject *notes = PyList_New(0);
	size_t i;

	for (i = 0; i < b->count; i++) {
		struct exec_req *req = &b->reqs[i];
		const struct eng_frame *f = &req->frame;

		eng_handles_remove(&b->scanner->inflight, f->handle);
		if (f->kind == ENG_FRAME_INVALID) {
			eng_count_refusal(&b->counters->counts);
			if (notes && exec_add_note(notes, "refused", f, req->error,
					       f->reason))
				Py_CLEAR(notes);
			continue;
		}
		eng_count_request(&b->counters->counts, f->opcode, f->length,
				  req->error, seconds);
		if (req->io_error && notes &&
		    exec_add_note(notes, "io_error", f, req->error,
			      strerror(req->io_error)))
			Py_CLEAR(notes);
	}
	return notes;
}

/* The objects run() and flush() are given, checked. */
static int exec_parse(PyObject *const *args, EngScanner **scanner,
		      EngVolume **volume, EngCounters **counters)
{
	if (!PyObject_TypeCheck(args[0], &eng_scanner_type) ||
	    !PyObject_TypeCheck(args[1], &eng_volume_type) ||
	    !PyObject_TypeCheck(args[2], &eng_counters_type)) {
		PyErr_SetString(PyExc_TypeError,
				"a Scanner, a Volume and Counters");
		return -1;
	}
	*scanner = (EngScanner *)args[0];
	*volume = (EngVolume *)args[1];
	*counters = (EngCounters *)args[2];
	if ((*scanner)->geometry.size > (*volume)->size) {
		PyErr_SetString(PyExc_ValueError,
				"the scanner admits more than the volume holds");
		return -1;
	}
	return 0;
}

/* The frame that stopped the batch, for Python: a FLUSH's handle, a
 * broken frame's reason, else None. */
static PyObject *exec_stop_detail(const struct exec_batch *b)
{
	if (b->stop == ENG_STOP_FLUSH)
		return PyLong_FromUnsignedLongLong(b->last.handle);
	if (b->stop == ENG_STOP_BROKEN)
		return PyUnicode_FromString(b->last.reason);
	return Py_NewRef(Py_None);
}

const char eng_run_doc[] =
"run(scanner, volume, counters, buffer, start, room, payload_room, /)\n"
"    -> (consumed, reply, taken, payload, stop, detail, notes)\n\n"
"Answer the request frames of bytearray buffer from offset start as one\n"
"batch of at most room requests and about payload_room bytes of READ and\n"
"WRITE payload (the last one may pass it).  reply is every answer, in\n"
"frame order, ready to send; consumed bytes of the buffer are done with\n"
"(WRITE payloads in them are left encrypted).  stop is a STOP_* constant;\n"
"detail is a FLUSH's handle (STOP_FLUSH: run flush() for it) or a broken\n"
"frame's reason (STOP_BROKEN), else None.  notes are (event, handle,\n"
"opcode, offset, length, error, reason) for refused requests and store\n"
"failures, event 'refused' or 'io_error'.";

PyObject *eng_run(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
	struct exec_batch b = { 0 };
	EVP_CIPHER_CTX *enc = NULL, *dec = NULL;
	bool cipher_failed = false;
	PyObject *notes = NULL, *detail, *result = NULL;
	Py_ssize_t start, room, payload_room;
	Py_buffer held;
	size_t i;

	if (nargs != 7) {
		PyErr_SetString(PyExc_TypeError, "run() takes 7 arguments");
		return NULL;
	}
	if (exec_parse(args, &b.scanner, &b.volume, &b.counters))
		return NULL;
	if (!PyByteArray_Check(args[3])) {
		PyErr_SetString(PyExc_TypeError, "buffer must be a bytearray");
		return NULL;
	}
	start = PyLong_AsSsize_t(args[4]);
	room = PyLong_AsSsize_t(args[5]);
	payload_room = PyLong_AsSsize_t(args[6]);
	if (PyErr_Occurred())
		return NULL;
	if (room < 1 || payload_room < 0) {
		PyErr_SetString(PyExc_ValueError,
				"room must be >= 1, payload_room >= 0");
		return NULL;
	}
	/* Exported until the end: the bytes stay where they are (a resize
	 * raises BufferError) while the GIL is released. */
	if (PyObject_GetBuffer(args[3], &held, PyBUF_WRITABLE))
		return NULL;
	if (start < 0 || start > held.len) {
		PyErr_SetString(PyExc_ValueError, "start outside the buffer");
		goto release;
	}
	b.in = (unsigned char *)held.buf + start;
	b.avail = (size_t)(held.len - start);
	/* no more requests than the buffer holds headers */
	if ((size_t)room > b.avail / sizeof(struct netblk_request))
		room = (Py_ssize_t)(b.avail / sizeof(struct netblk_request)) + 1;
	b.reqs = PyMem_Malloc((size_t)room * sizeof(*b.reqs));
	if (!b.reqs) {
		PyErr_NoMemory();
		goto release;
	}
	memset(b.reqs, 0, (size_t)room * sizeof(*b.reqs));
	b.began = exec_clock();
	if (exec_scan(&b, (size_t)room, (uint64_t)payload_room))
		goto free_reqs;
	if (exec_prepare(&b))
		goto settle;
	if ((b.encrypts && !(enc = eng_key_take(b.volume->key, 1))) ||
	    (b.decrypts && !(dec = eng_key_take(b.volume->key, 0))))
		goto put_keys;
	Py_BEGIN_ALLOW_THREADS
	exec_io(&b, enc, dec, &cipher_failed);
	Py_END_ALLOW_THREADS
	if (cipher_failed) {
		PyErr_SetString(PyExc_RuntimeError,
				"OpenSSL refused an AES-XTS data unit");
		goto put_keys;
	}
	if (exec_answer(&b))
		goto put_keys;
	notes = exec_settle(&b, exec_clock() - b.began);
	if (!notes)
		goto put_keys;
	detail = exec_stop_detail(&b);
	if (detail)
		result = Py_BuildValue("(nOnKiNN)", (Py_ssize_t)b.consumed,
				       b.reply, (Py_ssize_t)b.count,
				       (unsigned long long)b.payload,
				       (int)b.stop, detail, notes);
	else
		Py_DECREF(notes);
put_keys:
	/* a context OpenSSL refused a unit with is in an unknown state */
	if (enc)
		cipher_failed ? EVP_CIPHER_CTX_free(enc) :
				eng_key_put(b.volume->key, 1, enc);
	if (dec)
		cipher_failed ? EVP_CIPHER_CTX_free(dec) :
				eng_key_put(b.volume->key, 0, dec);
settle:
	if (!result)	/* the batch's handles must not stay in flight */
		for (i = 0; i < b.count; i++)
			eng_handles_remove(&b.scanner->inflight,
					   b.reqs[i].frame.handle);
	Py_XDECREF(b.reply);
	PyMem_Free(b.ios);
free_reqs:
	PyMem_Free(b.reqs);
release:
	PyBuffer_Release(&held);
	return result;
}

const char eng_flush_doc[] =
"flush(scanner, volume, counters, handle, /) -> (error, note)\n\n"
"Run the FLUSH that run() stopped at (STOP_FLUSH): every write completed\n"
"before it is durable when it returns.  error is the reply's NETBLK_E*\n"
"errno; the handle stays in flight until the caller sends the reply made\n"
"by scanner.answer(handle, error), which may be on another thread.  The\n"
"GIL is released while the store flushes.  note is None, or an 'io_error'\n"
"note as run() makes them.";

PyObject *eng_flush(PyObject *Py_UNUSED(module), PyObject *const *args,
		    Py_ssize_t nargs)
{
	struct eng_frame frame = { .opcode = NETBLK_CMD_FLUSH };
	struct eng_io io = { .op = ENG_IO_FLUSH };
	EngScanner *scanner;
	EngVolume *volume;
	EngCounters *counters;
	PyObject *note;
	uint32_t error = NETBLK_EOK;
	double began;

	if (nargs != 4) {
		PyErr_SetString(PyExc_TypeError, "flush() takes 4 arguments");
		return NULL;
	}
	if (exec_parse(args, &scanner, &volume, &counters))
		return NULL;
	frame.handle = PyLong_AsUnsignedLongLong(args[3]);
	if (PyErr_Occurred())
		return NULL;
	began = exec_clock();
	Py_BEGIN_ALLOW_THREADS
	eng_store_run(volume->store->store, &io, 1);
	Py_END_ALLOW_THREADS
	if (io.error)
		error = exec_wire_error(io.error);
	eng_count_request(&counters->counts, NETBLK_CMD_FLUSH, 0, error,
			  exec_clock() - began);
	if (!io.error)
		return Py_BuildValue("(kO)", (unsigned long)error, Py_None);
	note = exec_note("io_error", &frame, error, strerror(io.error));
	if (!note)
		return NULL;
	return Py_BuildValue("(kN)", (unsigned long)error, note);
}
