// SPDX-License-Identifier: GPL-2.0
/*
 * Request statistics: what storaged.stats shows operators per export and
 * per client.  The engine counts each request as it answers it, with the
 * GIL held, into the Counters of the connection's (export, client) pair.
 */
#include "engine.h"

/**
 * eng_count_request - count one answered request
 * @counts: its pair's counters
 * @opcode: a NETBLK_CMD_* the frame scan accepted
 * @length: its length field
 * @error: the NETBLK_E* it was answered with; a failed request moved no
 *	bytes
 * @seconds: how long it took, counted as int(seconds * 10^6) or 1
 *	microseconds into power-of-two buckets, the last one open-ended
 */
void eng_count_request(struct eng_counts *counts, uint16_t opcode,
		       uint32_t length, uint32_t error, double seconds)
{
	double micros = seconds * 1e6;
	uint64_t us;
	int bucket;

	counts->requests[opcode]++;
	if (error)
		counts->errors++;
	else if (opcode == NETBLK_CMD_READ)
		counts->bytes_read += length;
	else if (opcode == NETBLK_CMD_WRITE)
		counts->bytes_written += length;
	/* a clock that went back, or a wait past 2^62 us, still counts */
	us = micros >= 1 ? (micros < 0x1p62 ? (uint64_t)micros : 1ull << 62) :
			   1;
	bucket = 63 - __builtin_clzll(us);
	counts->latency[bucket < ENG_LATENCY_BUCKETS ?
			bucket : ENG_LATENCY_BUCKETS - 1]++;
	counts->count++;
	counts->total_us += us;
	if (us > counts->max_us)
		counts->max_us = us;
}

/* Count a request refused before it reached the store (EINVAL, EPERM). */
void eng_count_refusal(struct eng_counts *counts)
{
	counts->refused++;
	counts->errors++;
}

/* ---- the Counters type ------------------------------------------------ */

static PyObject *counters_new(PyTypeObject *type, PyObject *args,
			      PyObject *kwds)
{
	static char *kwlist[] = { NULL };

	if (!PyArg_ParseTupleAndKeywords(args, kwds, ":Counters", kwlist))
		return NULL;
	return type->tp_alloc(type, 0);
}

PyDoc_STRVAR(counters_add_doc,
"add(opcode, length, error, seconds, /) -> None\n\n"
"Count one answered request as the engine counts each one it answers:\n"
"error is the NETBLK_E* it was answered with (a failed request moves no\n"
"bytes), seconds how long it took.");

static PyObject *counters_add(EngCounters *self, PyObject *args)
{
	unsigned int opcode, length, error;
	double seconds;

	if (!PyArg_ParseTuple(args, "IIId:add", &opcode, &length, &error,
			      &seconds))
		return NULL;
	if (opcode >= ENG_OPCODES) {
		PyErr_Format(PyExc_ValueError, "no opcode %u", opcode);
		return NULL;
	}
	eng_count_request(&self->counts, (uint16_t)opcode, length, error,
			  seconds);
	Py_RETURN_NONE;
}

static int counters_put(PyObject *dict, const char *key, uint64_t value)
{
	PyObject *number = PyLong_FromUnsignedLongLong(value);
	int err;

	if (!number)
		return -1;
	err = PyDict_SetItemString(dict, key, number);
	Py_DECREF(number);
	return err;
}

PyDoc_STRVAR(counters_snapshot_doc,
"snapshot() -> dict\n\n"
"{'requests': {opcode: count}, 'refused': n, 'bytes_read': n,\n"
" 'bytes_written': n, 'errors': n, 'latency': {'buckets': [...],\n"
" 'count': n, 'total_us': n, 'max_us': n}}; requests counts answered\n"
"requests by their NETBLK_CMD_* opcode (ones never seen are left out),\n"
"refused those refused before reaching the store; bucket i counts\n"
"latencies in [2**i, 2**(i+1)) microseconds, the last one everything\n"
"above.");

static PyObject *counters_snapshot(EngCounters *self, PyObject *Py_UNUSED(unused))
{
	/* copied first: making objects may run code that counts */
	struct eng_counts c = self->counts;
	PyObject *snap = PyDict_New(), *requests = NULL, *latency = NULL;
	PyObject *buckets = NULL;
	int i;

	if (!snap)
		return NULL;
	requests = PyDict_New();
	latency = PyDict_New();
	buckets = PyList_New(ENG_LATENCY_BUCKETS);
	if (!requests || !latency || !buckets)
		goto fail;
	for (i = 0; i < ENG_OPCODES; i++) {
		PyObject *op, *count;
		int err;

		if (!c.requests[i])
			continue;
		op = PyLong_FromLong(i);
		count = PyLong_FromUnsignedLongLong(c.requests[i]);
		err = !op || !count || PyDict_SetItem(requests, op, count);
		Py_XDECREF(op);
		Py_XDECREF(count);
		if (err)
			goto fail;
	}
	for (i = 0; i < ENG_LATENCY_BUCKETS; i++) {
		PyObject *count = PyLong_FromUnsignedLongLong(c.latency[i]);

		if (!count)
			goto fail;
		PyList_SET_ITEM(buckets, i, count);
	}
	if (PyDict_SetItemString(latency, "buckets", buckets) ||
	    counters_put(latency, "count", c.count) ||
	    counters_put(latency, "total_us", c.total_us) ||
	    counters_put(latency, "max_us", c.max_us) ||
	    PyDict_SetItemString(snap, "requests", requests) ||
	    counters_put(snap, "refused", c.refused) ||
	    counters_put(snap, "bytes_read", c.bytes_read) ||
	    counters_put(snap, "bytes_written", c.bytes_written) ||
	    counters_put(snap, "errors", c.errors) ||
	    PyDict_SetItemString(snap, "latency", latency))
		goto fail;
	Py_DECREF(requests);
	Py_DECREF(latency);
	Py_DECREF(buckets);
	return snap;

fail:
	Py_XDECREF(requests);
	Py_XDECREF(latency);
	Py_XDECREF(buckets);
	Py_DECREF(snap);
	return NULL;
}

static PyMethodDef counters_methods[] = {
	{ "add", (PyCFunction)counters_add, METH_VARARGS, counters_add_doc },
	{ "snapshot", (PyCFunction)counters_snapshot, METH_NOARGS,
	  counters_snapshot_doc },
	{ NULL },
};

PyTypeObject eng_counters_type = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "storaged._engine.Counters",
	.tp_doc = "Counters()\n\n"
		  "Requests, bytes, errors and latencies of one (export, "
		  "client) pair.",
	.tp_basicsize = sizeof(EngCounters),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = counters_new,
	.tp_methods = counters_methods,
};
