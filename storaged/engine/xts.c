// SPDX-License-Identifier: GPL-2.0
/*
 * AES-XTS over a run of data units, each with its own tweak: a LUKS2
 * sector is an XTS data unit whose tweak is its plain64 IV.
 *
 * Python crypto libraries can only change an XTS tweak by building a new
 * cipher context per sector, which costs more than encrypting the 4 KiB
 * sector; OpenSSL's EVP API can re-initialise just the tweak of a keyed
 * context.  A Key is keyed once per volume key; runs use copies of it,
 * kept for the next run: keying a context per call cost two AES key
 * expansions and a provider round trip, copying one a pair of
 * allocations, each more than the XTS of a 4 KiB sector on the host.
 *
 * Decrypting, a run can pass holes through: a data unit that is all zero
 * bytes in the store was never written (a hole of a sparse volume file, a
 * discarded range of an image) and reads as zeros.  Real AES-XTS output is
 * all zeros with probability 2^-32768.
 */
#include "engine.h"

#include <string.h>

#define XTS_TWEAK_SIZE 16

/* Fetched once: an implicit fetch on every EVP_CipherInit is slow. */
static EVP_CIPHER *xts_aes128;
static EVP_CIPHER *xts_aes256;

/* Whether len > 0 bytes at p are all zero: the first byte, then each byte
 * against the one before it.  Ciphertext fails at its first byte. */
static bool xts_all_zero(const unsigned char *p, size_t len)
{
	return !p[0] && !memcmp(p, p + 1, len - 1);
}

/* Fetch the ciphers; 0, or -1 with ImportError set. */
int eng_xts_setup(void)
{
	if (!xts_aes128)
		xts_aes128 = EVP_CIPHER_fetch(NULL, "AES-128-XTS", NULL);
	if (!xts_aes256)
		xts_aes256 = EVP_CIPHER_fetch(NULL, "AES-256-XTS", NULL);
	if (xts_aes128 && xts_aes256)
		return 0;
	PyErr_SetString(PyExc_ImportError, "OpenSSL offers no AES-XTS cipher");
	return -1;
}

/**
 * eng_key_take - a copy of @key's context for one direction (GIL held)
 * @key: the expanded key
 * @encrypt: 1 to encrypt, 0 to decrypt
 *
 * Return: the context, for use without the GIL and eng_key_put() after,
 * or NULL with MemoryError set.
 */
EVP_CIPHER_CTX *eng_key_take(EngKey *key, int encrypt)
{
	EVP_CIPHER_CTX *ctx;

	if (key->spares[encrypt])
		return key->spare[encrypt][--key->spares[encrypt]];
	ctx = EVP_CIPHER_CTX_new();
	if (ctx && !EVP_CIPHER_CTX_copy(ctx, key->keyed[encrypt])) {
		EVP_CIPHER_CTX_free(ctx);
		ctx = NULL;
	}
	if (!ctx)
		PyErr_SetString(PyExc_MemoryError,
				"OpenSSL could not copy the AES-XTS context");
	return ctx;
}

/* Keep @ctx for the next run, or free it if enough are kept (GIL held). */
void eng_key_put(EngKey *key, int encrypt, EVP_CIPHER_CTX *ctx)
{
	if (key->spares[encrypt] < ENG_XTS_SPARES)
		key->spare[encrypt][key->spares[encrypt]++] = ctx;
	else
		EVP_CIPHER_CTX_free(ctx);
}

/**
 * eng_xts_run - en- or decrypt @len bytes at @buf in place
 * @ctx: a context from eng_key_take() for this direction
 * @buf: a run of @unit-byte data units
 * @len: a multiple of @unit
 * @unit: the data unit (sector) size
 * @tweak: the first unit's tweak; unit k has @tweak + k * @step
 * @step: tweak units per data unit
 * @encrypt: 1 to encrypt, 0 to decrypt
 * @keep_holes: decrypting, leave all-zero units as zeros
 *
 * Runs without the GIL.  Return: 0, or -1 if OpenSSL refused a unit (then
 * @ctx is in an unknown state: free it).
 */
int eng_xts_run(EVP_CIPHER_CTX *ctx, unsigned char *buf, size_t len,
		size_t unit, uint64_t tweak, uint64_t step, int encrypt,
		bool keep_holes)
{
	unsigned char iv[XTS_TWEAK_SIZE] = { 0 };
	size_t pos;
	int out_len, i;

	for (pos = 0; pos < len; pos += unit, tweak += step) {
		if (keep_holes && xts_all_zero(buf + pos, unit))
			continue;
		for (i = 0; i < 8; i++)
			iv[i] = (unsigned char)(tweak >> (8 * i));
		if (!EVP_CipherInit_ex2(ctx, NULL, NULL, iv, encrypt, NULL) ||
		    !EVP_CipherUpdate(ctx, buf + pos, &out_len, buf + pos,
				      (int)unit))
			return -1;
	}
	return 0;
}

/* ---- the Key type ----------------------------------------------------- */

static void key_dealloc(EngKey *self)
{
	int encrypt;

	for (encrypt = 0; encrypt < 2; encrypt++) {
		while (self->spares[encrypt])
			EVP_CIPHER_CTX_free(
				self->spare[encrypt][--self->spares[encrypt]]);
		EVP_CIPHER_CTX_free(self->keyed[encrypt]);
	}
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *key_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = { "key", NULL };
	EngKey *self = NULL;
	Py_buffer key;
	int encrypt;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*:Key", kwlist, &key))
		return NULL;
	if (key.len != 32 && key.len != 64) {
		PyErr_Format(PyExc_ValueError,
			     "AES-XTS needs a 256- or 512-bit key, got %zd bits",
			     key.len * 8);
		goto release;
	}
	self = (EngKey *)type->tp_alloc(type, 0);
	if (!self)
		goto release;
	for (encrypt = 0; encrypt < 2; encrypt++) {
		self->keyed[encrypt] = EVP_CIPHER_CTX_new();
		if (!self->keyed[encrypt] ||
		    !EVP_CipherInit_ex2(self->keyed[encrypt],
					key.len == 64 ? xts_aes256 : xts_aes128,
					key.buf, NULL, encrypt, NULL)) {
			PyErr_SetString(PyExc_ValueError,
					"OpenSSL refused the AES-XTS key");
			Py_CLEAR(self);
			goto release;
		}
	}
release:
	PyBuffer_Release(&key);
	return (PyObject *)self;
}

PyDoc_STRVAR(key_crypt_doc,
"crypt(data, unit_size, first_tweak, tweak_step, encrypt, /) -> bytes\n\n"
"En- or decrypt data, a run of unit_size-byte data units; unit k has the\n"
"64-bit tweak first_tweak + k * tweak_step (little-endian, zero-padded to\n"
"16 bytes).  The GIL is released while it runs.");

static PyObject *key_crypt(EngKey *self, PyObject *args)
{
	unsigned long long tweak, step;
	PyObject *result = NULL;
	EVP_CIPHER_CTX *ctx;
	Py_ssize_t unit;
	Py_buffer data;
	int encrypt, failed;

	if (!PyArg_ParseTuple(args, "y*nKKp:crypt", &data, &unit, &tweak,
			      &step, &encrypt))
		return NULL;
	if (unit < XTS_TWEAK_SIZE || unit > INT_MAX || data.len % unit) {
		PyErr_Format(PyExc_ValueError,
			     "%zd bytes is not a run of %zd-byte data units",
			     data.len, unit);
		goto release;
	}
	result = PyBytes_FromStringAndSize(data.buf, data.len);
	if (!result)
		goto release;
	ctx = eng_key_take(self, encrypt);
	if (!ctx) {
		Py_CLEAR(result);
		goto release;
	}
	Py_BEGIN_ALLOW_THREADS
	failed = eng_xts_run(ctx, (unsigned char *)PyBytes_AS_STRING(result),
			     (size_t)data.len, (size_t)unit, tweak, step,
			     encrypt, false);
	Py_END_ALLOW_THREADS
	if (failed) {
		EVP_CIPHER_CTX_free(ctx);
		PyErr_SetString(PyExc_RuntimeError,
				"OpenSSL refused an AES-XTS data unit");
		Py_CLEAR(result);
	} else {
		eng_key_put(self, encrypt, ctx);
	}
release:
	PyBuffer_Release(&data);
	return result;
}

static PyMethodDef key_methods[] = {
	{ "crypt", (PyCFunction)key_crypt, METH_VARARGS, key_crypt_doc },
	{ NULL },
};

PyTypeObject eng_key_type = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "storaged._engine.Key",
	.tp_doc = "Key(key)\n\n"
		  "An AES-XTS key (32 or 64 bytes), expanded once for every "
		  "later run.",
	.tp_basicsize = sizeof(EngKey),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = key_new,
	.tp_dealloc = (destructor)key_dealloc,
	.tp_methods = key_methods,
};
