// SPDX-License-Identifier: GPL-2.0
/*
 * storaged._cache: the decrypted-sector cache's bookkeeping in C.
 *
 * Every read asks the cache, and most random reads miss: in Python the miss
 * alone cost a 4 KiB READ about 2 us on the host (a lock, an OrderedDict
 * insert and eviction, the calls around them), a fifth of the request.
 * Here a lookup is a hash probe.  No method releases the GIL or runs Python
 * code while it changes the maps (the only objects dropped are bytes), so
 * the GIL serialises them and the cache needs no lock of its own.
 *
 * Semantics are storaged.cache's (docs/architecture.md, "Read cache"): an
 * LRU of sectors bounded by capacity, ranges taken in on their second miss
 * (the keys of as many missed ranges as the cache holds sectors are
 * remembered, in their own LRU), and stripe generations that stop a fill
 * whose range a write touched while it was being read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <structmember.h>

/* Generation stripes; more stripes mean fewer fills lost to unrelated
 * writes. */
#define CACHE_STRIPES 1024

/* One key in an LruMap: a cached sector (data set) or a missed range. */
typedef struct CacheEntry {
	uint64_t volume, sector;	/* the key */
	PyObject *data;			/* owned bytes, or NULL */
	struct CacheEntry *older, *newer;	/* LRU order */
	struct CacheEntry *chain;	/* next in the same hash bucket */
} CacheEntry;

/* A hash map that keeps its keys in least-recently-used order. */
typedef struct {
	CacheEntry **buckets;
	int shift;			/* 64 - log2(buckets) */
	CacheEntry *oldest, *newest;
	Py_ssize_t count;
} LruMap;

/* Everything here is protected by the GIL (see the top of the file). */
typedef struct {
	PyObject_HEAD
	Py_ssize_t sector_size;
	Py_ssize_t capacity;	/* sectors (and remembered misses) */
	LruMap entries;
	LruMap missed;
	uint64_t generations[CACHE_STRIPES];
	unsigned long long hits, misses;
} SectorCacheCore;

static CacheEntry **lru_slot(LruMap *map, uint64_t volume, uint64_t sector)
{
	/* Fibonacci hashing: consecutive sectors spread over the buckets. */
	uint64_t mixed = (sector ^ volume * 0xC2B2AE3D27D4EB4Full);

	return &map->buckets[(mixed * 0x9E3779B97F4A7C15ull) >> map->shift];
}

static int lru_init(LruMap *map, Py_ssize_t capacity)
{
	int bits = 4;

	while (((Py_ssize_t)1 << bits) < 2 * capacity)
		bits++;
	map->buckets = PyMem_Calloc((size_t)1 << bits, sizeof(CacheEntry *));
	if (!map->buckets)
		return -1;
	map->shift = 64 - bits;
	map->oldest = map->newest = NULL;
	map->count = 0;
	return 0;
}

static CacheEntry *lru_find(LruMap *map, uint64_t volume, uint64_t sector)
{
	CacheEntry *entry = *lru_slot(map, volume, sector);

	while (entry && (entry->sector != sector || entry->volume != volume))
		entry = entry->chain;
	return entry;
}

static void lru_unlink(LruMap *map, CacheEntry *entry)
{
	if (entry->older)
		entry->older->newer = entry->newer;
	else
		map->oldest = entry->newer;
	if (entry->newer)
		entry->newer->older = entry->older;
	else
		map->newest = entry->older;
}

static void lru_append(LruMap *map, CacheEntry *entry)
{
	entry->older = map->newest;
	entry->newer = NULL;
	if (map->newest)
		map->newest->newer = entry;
	else
		map->oldest = entry;
	map->newest = entry;
}

static void lru_touch(LruMap *map, CacheEntry *entry)
{
	if (map->newest != entry) {
		lru_unlink(map, entry);
		lru_append(map, entry);
	}
}

/* Drop an entry (found with lru_find) from the map and free it. */
static void lru_remove(LruMap *map, CacheEntry *entry)
{
	CacheEntry **link = lru_slot(map, entry->volume, entry->sector);

	while (*link != entry)
		link = &(*link)->chain;
	*link = entry->chain;
	lru_unlink(map, entry);
	map->count--;
	Py_XDECREF(entry->data);
	PyMem_Free(entry);
}

/* Insert or refresh a key as the newest; takes a new reference to data. */
static int lru_put(LruMap *map, uint64_t volume, uint64_t sector,
		   PyObject *data)
{
	CacheEntry *entry = lru_find(map, volume, sector);
	CacheEntry **slot;

	if (entry) {
		Py_XINCREF(data);
		Py_XSETREF(entry->data, data);
		lru_touch(map, entry);
		return 0;
	}
	entry = PyMem_Malloc(sizeof(*entry));
	if (!entry) {
		PyErr_NoMemory();
		return -1;
	}
	slot = lru_slot(map, volume, sector);
	entry->volume = volume;
	entry->sector = sector;
	Py_XINCREF(data);
	entry->data = data;
	entry->chain = *slot;
	*slot = entry;
	lru_append(map, entry);
	map->count++;
	return 0;
}

static void lru_trim(LruMap *map, Py_ssize_t most)
{
	while (map->count > most)
		lru_remove(map, map->oldest);
}

static void lru_free(LruMap *map)
{
	if (!map->buckets)
		return;
	lru_trim(map, 0);
	PyMem_Free(map->buckets);
	map->buckets = NULL;
}

static int stripe(uint64_t volume, uint64_t sector)
{
	return (int)((sector + volume * 7919) % CACHE_STRIPES);
}

/* The generations of the stripes a range maps to, as lookup hands them to
 * a read that is taken in and fill checks them: a tuple of ints. */
static PyObject *stripe_generations(SectorCacheCore *self, uint64_t volume,
				    uint64_t first, Py_ssize_t count)
{
	Py_ssize_t n = count >= CACHE_STRIPES ? CACHE_STRIPES : count;
	PyObject *tuple = PyTuple_New(n);
	PyObject *value;
	Py_ssize_t i;

	if (!tuple)
		return NULL;
	for (i = 0; i < n; i++) {
		int index = count >= CACHE_STRIPES ? (int)i :
			    stripe(volume, first + (uint64_t)i);

		value = PyLong_FromUnsignedLongLong(self->generations[index]);
		if (!value) {
			Py_DECREF(tuple);
			return NULL;
		}
		PyTuple_SET_ITEM(tuple, i, value);
	}
	return tuple;
}

/* A range's volume and first sector from Python ints, checked with its
 * sector count: every sector number fits in 64 bits. */
static int parse_range(PyObject *volume_arg, PyObject *first_arg,
		       Py_ssize_t count, uint64_t *volume, uint64_t *first)
{
	unsigned long long v = PyLong_AsUnsignedLongLong(volume_arg);
	unsigned long long f;

	if (v == (unsigned long long)-1 && PyErr_Occurred())
		return -1;
	f = PyLong_AsUnsignedLongLong(first_arg);
	if (f == (unsigned long long)-1 && PyErr_Occurred())
		return -1;
	if (count < 0 || f + (uint64_t)count < f) {
		PyErr_SetString(PyExc_ValueError, "sector range out of bounds");
		return -1;
	}
	*volume = v;
	*first = f;
	return 0;
}

/* (volume, first, count) as lookup and invalidate take them. */
static int parse_range_args(PyObject *const *args, uint64_t *volume,
			    uint64_t *first, Py_ssize_t *count)
{
	*count = PyLong_AsSsize_t(args[2]);
	if (*count == -1 && PyErr_Occurred())
		return -1;
	return parse_range(args[0], args[1], *count, volume, first);
}

static int core_init(SectorCacheCore *self, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {"capacity_bytes", "sector_size", NULL};
	Py_ssize_t capacity_bytes, sector_size;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "nn", kwlist,
					 &capacity_bytes, &sector_size))
		return -1;
	if (capacity_bytes < 0 || sector_size <= 0) {
		PyErr_SetString(PyExc_ValueError,
				"capacity must be >= 0 and sector size > 0");
		return -1;
	}
	/* A second __init__ would reset the generations that stop stale fills
	 * by reads admitted before it. */
	if (self->entries.buckets) {
		PyErr_SetString(PyExc_RuntimeError,
				"cache already initialised");
		return -1;
	}
	if (capacity_bytes / sector_size > PY_SSIZE_T_MAX / 4) {
		PyErr_SetString(PyExc_OverflowError,
				"cache capacity too large");
		return -1;
	}
	if (lru_init(&self->entries, capacity_bytes / sector_size) ||
	    lru_init(&self->missed, capacity_bytes / sector_size)) {
		lru_free(&self->entries);
		PyErr_NoMemory();
		return -1;
	}
	self->sector_size = sector_size;
	self->capacity = capacity_bytes / sector_size;
	return 0;
}

/* Whether __init__ ran (a bare __new__ leaves no maps), else an error. */
static int ready(SectorCacheCore *self)
{
	if (self->missed.buckets)
		return 1;
	PyErr_SetString(PyExc_RuntimeError, "cache not initialised");
	return 0;
}

static void core_dealloc(SectorCacheCore *self)
{
	lru_free(&self->entries);
	lru_free(&self->missed);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The second miss of a range takes it in: its generations, else None. */
static PyObject *admit(SectorCacheCore *self, uint64_t volume, uint64_t first,
		       Py_ssize_t count)
{
	CacheEntry *seen = lru_find(&self->missed, volume, first);

	if (seen) {
		lru_remove(&self->missed, seen);
		return stripe_generations(self, volume, first, count);
	}
	if (lru_put(&self->missed, volume, first, NULL))
		return NULL;
	lru_trim(&self->missed, self->capacity);
	Py_RETURN_NONE;
}

static PyObject *core_lookup(SectorCacheCore *self, PyObject *const *args,
			     Py_ssize_t nargs, PyObject *kwnames)
{
	uint64_t volume, first;
	Py_ssize_t count, i;
	int take_in = 1;
	PyObject *found, *admission;

	if (nargs != 3 || (kwnames && (PyTuple_GET_SIZE(kwnames) != 1 ||
		!PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)) ||
		PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0),
						 "admit")))) {
		PyErr_SetString(PyExc_TypeError,
				"lookup(volume, first, count, *, admit=True)");
		return NULL;
	}
	if (kwnames) {
		take_in = PyObject_IsTrue(args[3]);
		if (take_in < 0)
			return NULL;
	}
	if (!ready(self) || parse_range_args(args, &volume, &first, &count))
		return NULL;
	if (!self->capacity)
		return Py_BuildValue("(OO)", Py_None, Py_None);
	if (!count)	/* nothing asked for, all of it found */
		return Py_BuildValue("([]O)", Py_None);
	/* Most reads miss at their first sector: answer those before making
	 * the list.  Making it may run the garbage collector, and with it a
	 * finalizer that lets another thread change the cache, so the sectors
	 * are looked up again after. */
	found = NULL;
	if (count <= self->entries.count &&
	    lru_find(&self->entries, volume, first)) {
		found = PyList_New(count);
		if (!found)
			return NULL;
	}
	for (i = 0; found && i < count; i++) {
		CacheEntry *entry;

		entry = lru_find(&self->entries, volume, first + (uint64_t)i);
		if (!entry) {
			Py_CLEAR(found);
			break;
		}
		Py_INCREF(entry->data);
		PyList_SET_ITEM(found, i, entry->data);
	}
	if (!found) {
		self->misses += (unsigned long long)count;
		if (!take_in)
			return Py_BuildValue("(OO)", Py_None, Py_None);
		admission = admit(self, volume, first, count);
		if (!admission)
			return NULL;
		return Py_BuildValue("(ON)", Py_None, admission);
	}
	for (i = 0; i < count; i++) {
		CacheEntry *entry;

		entry = lru_find(&self->entries, volume, first + (uint64_t)i);
		lru_touch(&self->entries, entry);
	}
	self->hits += (unsigned long long)count;
	return Py_BuildValue("(NO)", found, Py_None);
}

static PyObject *core_fill(SectorCacheCore *self, PyObject *const *args,
			   Py_ssize_t nargs)
{
	uint64_t volume, first;
	Py_ssize_t sectors, skip, i, size = self->sector_size;
	PyObject *now;
	Py_buffer data;
	int same;

	if (nargs != 4) {
		PyErr_SetString(PyExc_TypeError,
				"fill(volume, first, data, admission)");
		return NULL;
	}
	if (!ready(self) || PyObject_GetBuffer(args[2], &data, PyBUF_SIMPLE))
		return NULL;
	sectors = data.len / size;
	if (parse_range(args[0], args[1], sectors, &volume, &first))
		goto fail;
	now = stripe_generations(self, volume, first, sectors);
	if (!now)
		goto fail;
	same = PyObject_RichCompareBool(now, args[3], Py_EQ);
	Py_DECREF(now);
	if (same <= 0) {
		if (same < 0)
			goto fail;
		PyBuffer_Release(&data);
		Py_RETURN_FALSE;
	}
	/* Only the last sectors fit when the range is larger than the cache. */
	skip = sectors > self->capacity ? sectors - self->capacity : 0;
	for (i = skip; i < sectors; i++) {
		PyObject *sector = PyBytes_FromStringAndSize(
			(const char *)data.buf + i * size, size);
		int failed;

		if (!sector)
			goto fail;
		failed = lru_put(&self->entries, volume, first + (uint64_t)i,
				 sector);
		Py_DECREF(sector);
		if (failed)
			goto fail;
	}
	lru_trim(&self->entries, self->capacity);
	PyBuffer_Release(&data);
	Py_RETURN_TRUE;
fail:
	lru_trim(&self->entries, self->capacity);	/* a partial fill */
	PyBuffer_Release(&data);
	return NULL;
}

static PyObject *core_invalidate(SectorCacheCore *self, PyObject *const *args,
				 Py_ssize_t nargs)
{
	uint64_t volume, first, end;
	Py_ssize_t count, i;

	if (nargs != 3) {
		PyErr_SetString(PyExc_TypeError,
				"invalidate(volume, first, count)");
		return NULL;
	}
	if (!ready(self) || parse_range_args(args, &volume, &first, &count))
		return NULL;
	if (count >= CACHE_STRIPES) {
		for (i = 0; i < CACHE_STRIPES; i++)
			self->generations[i]++;
	} else {
		for (i = 0; i < count; i++)
			self->generations[stripe(volume,
						 first + (uint64_t)i)]++;
	}
	end = first + (uint64_t)count;
	if (count > self->entries.count) {
		CacheEntry *entry = self->entries.oldest, *newer;

		for (; entry; entry = newer) {
			newer = entry->newer;
			if (entry->volume == volume && entry->sector >= first &&
			    entry->sector < end)
				lru_remove(&self->entries, entry);
		}
	} else {
		for (i = 0; i < count; i++) {
			CacheEntry *entry;

			entry = lru_find(&self->entries, volume,
					 first + (uint64_t)i);
			if (entry)
				lru_remove(&self->entries, entry);
		}
	}
	Py_RETURN_NONE;
}

/* The keys of a map, oldest first.  They are copied out before any Python
 * object is made: making one may run the garbage collector, and with it a
 * finalizer that lets another thread change the map. */
static PyObject *lru_keys(LruMap *map)
{
	Py_ssize_t count = map->count, i;
	uint64_t (*pairs)[2] = PyMem_Calloc(count ? count : 1, sizeof(*pairs));
	CacheEntry *entry = map->oldest;
	PyObject *keys = NULL;

	if (!pairs)
		return PyErr_NoMemory();
	for (i = 0; i < count; i++, entry = entry->newer) {
		pairs[i][0] = entry->volume;
		pairs[i][1] = entry->sector;
	}
	keys = PyList_New(count);
	for (i = 0; keys && i < count; i++) {
		PyObject *key = Py_BuildValue("(KK)", pairs[i][0], pairs[i][1]);

		if (!key)
			Py_CLEAR(keys);
		else
			PyList_SET_ITEM(keys, i, key);
	}
	PyMem_Free(pairs);
	return keys;
}

static PyObject *core_keys(SectorCacheCore *self, PyObject *unused)
{
	PyObject *entries, *missed;

	if (!ready(self))
		return NULL;
	entries = lru_keys(&self->entries);
	if (!entries)
		return NULL;
	missed = lru_keys(&self->missed);
	if (!missed) {
		Py_DECREF(entries);
		return NULL;
	}
	return Py_BuildValue("(NN)", entries, missed);
}

static PyObject *core_counters(SectorCacheCore *self, PyObject *unused)
{
	return Py_BuildValue("(nKK)", self->entries.count, self->hits,
			     self->misses);
}

static PyMethodDef core_methods[] = {
	{"lookup", (PyCFunction)(void (*)(void))core_lookup,
	 METH_FASTCALL | METH_KEYWORDS,
	 "lookup(volume, first, count, *, admit=True)"
	 " -> (sectors or None, admission)"},
	{"fill", (PyCFunction)(void (*)(void))core_fill, METH_FASTCALL,
	 "fill(volume, first, data, admission) -> whether it went in"},
	{"invalidate", (PyCFunction)(void (*)(void))core_invalidate,
	 METH_FASTCALL, "invalidate(volume, first, count)"},
	{"keys", (PyCFunction)core_keys, METH_NOARGS,
	 "keys() -> ([(volume, sector) cached], [(volume, first) missed]),"
	 " least recently used first"},
	{"counters", (PyCFunction)core_counters, METH_NOARGS,
	 "counters() -> (sectors held, hits, misses)"},
	{NULL}
};

static PyMemberDef core_members[] = {
	{"sector_size", T_PYSSIZET, offsetof(SectorCacheCore, sector_size),
	 READONLY, "bytes per cached sector"},
	{"capacity", T_PYSSIZET, offsetof(SectorCacheCore, capacity),
	 READONLY, "sectors the cache holds at most"},
	{NULL}
};

static PyTypeObject SectorCacheCoreType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "storaged._cache.SectorCacheCore",
	.tp_basicsize = sizeof(SectorCacheCore),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
	.tp_doc = "LRU of decrypted sectors with second-miss admission "
		  "(storaged.cache.SectorCache)",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)core_init,
	.tp_dealloc = (destructor)core_dealloc,
	.tp_methods = core_methods,
	.tp_members = core_members,
};

static struct PyModuleDef cache_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "storaged._cache",
	.m_doc = "The decrypted-sector cache's bookkeeping (storaged.cache).",
	.m_size = -1,
};

PyMODINIT_FUNC PyInit__cache(void)
{
	PyObject *module;

	if (PyType_Ready(&SectorCacheCoreType) < 0)
		return NULL;
	module = PyModule_Create(&cache_module);
	if (!module)
		return NULL;
	if (PyModule_AddIntConstant(module, "STRIPES", CACHE_STRIPES) ||
	    PyModule_AddObjectRef(module, "SectorCacheCore",
				  (PyObject *)&SectorCacheCoreType)) {
		Py_DECREF(module);
		return NULL;
	}
	return module;
}
