// SPDX-License-Identifier: GPL-2.0
/*
 * A volume: a LUKS2 data segment on a store, sealed with AES-XTS in
 * sectors whose tweak is dm-crypt's plain64 IV, counted in 512-byte units
 * from the segment's start plus the segment's iv_tweak (a 4096-byte
 * sector at offset o has tweak o / 512 + iv_tweak, not its index).
 */
#include "engine.h"

/* The plain64 tweak of the sector at byte @offset of the segment. */
uint64_t eng_volume_tweak(const EngVolume *volume, uint64_t offset)
{
	return volume->iv_tweak + offset / ENG_IV_UNIT;
}

static bool volume_sector_size_ok(unsigned int size)
{
	return size >= ENG_IV_UNIT && size <= NETBLK_BLOCK_SIZE &&
	       !(size & (size - 1));
}

static PyObject *volume_new(PyTypeObject *type, PyObject *args,
			    PyObject *kwds)
{
	static char *kwlist[] = { "store", "key", "data_offset", "size",
				  "sector_size", "iv_tweak", NULL };
	unsigned long long data_offset, size, iv_tweak;
	PyObject *store, *key;
	unsigned int sector_size;
	EngVolume *self;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!$KKIK:Volume", kwlist,
					 &eng_store_type, &store,
					 &eng_key_type, &key, &data_offset,
					 &size, &sector_size, &iv_tweak))
		return NULL;
	if (!((EngStore *)store)->store) {
		PyErr_SetString(PyExc_ValueError, "store not set up");
		return NULL;
	}
	if (!volume_sector_size_ok(sector_size)) {
		PyErr_Format(PyExc_ValueError,
			     "sector size %u is not a power of two in %d..%d",
			     sector_size, ENG_IV_UNIT, NETBLK_BLOCK_SIZE);
		return NULL;
	}
	if (!size || size % NETBLK_BLOCK_SIZE) {
		PyErr_Format(PyExc_ValueError,
			     "segment size %llu is not a positive multiple of %d",
			     size, NETBLK_BLOCK_SIZE);
		return NULL;
	}
	if (data_offset + size < data_offset) {
		PyErr_SetString(PyExc_ValueError,
				"the segment ends beyond 2^64 bytes");
		return NULL;
	}
	/* the last sector's last unit still has a plain64 tweak: no wrap */
	if (iv_tweak > UINT64_MAX - (size / ENG_IV_UNIT - 1)) {
		PyErr_Format(PyExc_ValueError,
			     "iv_tweak %llu and %llu bytes run past the plain64 "
			     "IV range", iv_tweak, size);
		return NULL;
	}
	self = (EngVolume *)type->tp_alloc(type, 0);
	if (!self)
		return NULL;
	self->store = (EngStore *)Py_NewRef(store);
	self->key = (EngKey *)Py_NewRef(key);
	self->data_offset = data_offset;
	self->size = size;
	self->sector_size = sector_size;
	self->iv_tweak = iv_tweak;
	self->writable = ((EngStore *)store)->store->writable;
	return (PyObject *)self;
}

static void volume_dealloc(EngVolume *self)
{
	Py_XDECREF(self->store);
	Py_XDECREF(self->key);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *volume_get_store(EngVolume *self, void *Py_UNUSED(closure))
{
	return Py_NewRef(self->store);
}

static PyObject *volume_get_size(EngVolume *self, void *Py_UNUSED(closure))
{
	return PyLong_FromUnsignedLongLong(self->size);
}

static PyObject *volume_get_writable(EngVolume *self, void *Py_UNUSED(closure))
{
	return PyBool_FromLong(self->writable);
}

static PyGetSetDef volume_getset[] = {
	{ "store", (getter)volume_get_store, NULL, "where the bytes live",
	  NULL },
	{ "size", (getter)volume_get_size, NULL, "bytes of the segment",
	  NULL },
	{ "writable", (getter)volume_get_writable, NULL,
	  "whether its store takes writes", NULL },
	{ NULL },
};

PyTypeObject eng_volume_type = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "storaged._engine.Volume",
	.tp_doc = "Volume(store, key, *, data_offset, size, sector_size, "
		  "iv_tweak)\n\n"
		  "A LUKS2 data segment of size bytes from data_offset of "
		  "store, sealed with AES-XTS key.",
	.tp_basicsize = sizeof(EngVolume),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = volume_new,
	.tp_dealloc = (destructor)volume_dealloc,
	.tp_getset = volume_getset,
};
