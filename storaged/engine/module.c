// SPDX-License-Identifier: GPL-2.0
/*
 * storaged._engine: the module.  Its types (Key, Store, FileStore, Volume,
 * Scanner, Counters), run() and flush(), and the constants Python needs to
 * read what they return.
 */
#include "engine.h"

#include <string.h>

static PyMethodDef engine_functions[] = {
	{ "run", (PyCFunction)(void (*)(void))eng_run, METH_FASTCALL,
	  eng_run_doc },
	{ "flush", (PyCFunction)(void (*)(void))eng_flush, METH_FASTCALL,
	  eng_flush_doc },
	{ NULL },
};

static struct PyModuleDef engine_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "storaged._engine",
	.m_doc = "storaged's request engine: framing, execution, AES-XTS, "
		 "stores and statistics.",
	.m_size = -1,
	.m_methods = engine_functions,
};

static PyTypeObject *const engine_types[] = {
	&eng_key_type, &eng_store_type, &eng_file_store_type,
	&eng_rbd_store_type,
	&eng_volume_type, &eng_scanner_type, &eng_counters_type,
};

/* What Python reads in scan()'s and run()'s answers. */
static const struct {
	const char *name;
	long value;
} engine_constants[] = {
	{ "FRAME_SHORT", ENG_FRAME_SHORT },
	{ "FRAME_REQUEST", ENG_FRAME_REQUEST },
	{ "FRAME_INVALID", ENG_FRAME_INVALID },
	{ "FRAME_DISCONNECT", ENG_FRAME_DISCONNECT },
	{ "FRAME_BROKEN", ENG_FRAME_BROKEN },
	{ "STOP_FULL", ENG_STOP_FULL },
	{ "STOP_SHORT", ENG_STOP_SHORT },
	{ "STOP_FLUSH", ENG_STOP_FLUSH },
	{ "STOP_DISCONNECT", ENG_STOP_DISCONNECT },
	{ "STOP_BROKEN", ENG_STOP_BROKEN },
	{ "LATENCY_BUCKETS", ENG_LATENCY_BUCKETS },
};

PyMODINIT_FUNC PyInit__engine(void)
{
	PyObject *module;
	size_t i;

	/* the wire structs as docs/protocol.md lays them out */
	Py_BUILD_ASSERT(sizeof(struct netblk_request) == 32);
	Py_BUILD_ASSERT(sizeof(struct netblk_reply) == 16);
	if (eng_xts_setup())
		return NULL;
	for (i = 0; i < sizeof(engine_types) / sizeof(engine_types[0]); i++)
		if (PyType_Ready(engine_types[i]) < 0)
			return NULL;
	module = PyModule_Create(&engine_module);
	if (!module)
		return NULL;
	for (i = 0; i < sizeof(engine_types) / sizeof(engine_types[0]); i++) {
		const char *name = strrchr(engine_types[i]->tp_name, '.') + 1;

		if (PyModule_AddObjectRef(module, name,
					  (PyObject *)engine_types[i]))
			goto fail;
	}
	for (i = 0; i < sizeof(engine_constants) / sizeof(engine_constants[0]);
	     i++)
		if (PyModule_AddIntConstant(module, engine_constants[i].name,
					    engine_constants[i].value))
			goto fail;
	return module;

fail:
	Py_DECREF(module);
	return NULL;
}
