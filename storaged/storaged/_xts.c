// SPDX-License-Identifier: GPL-2.0
/*
 * storaged._xts: AES-XTS over a run of data units, each with its own tweak,
 * in one call.
 *
 * A LUKS2 sector is an XTS data unit whose tweak is its plain64 IV.  Python
 * crypto libraries can only change an XTS tweak by building a new cipher
 * context per sector, which costs more than encrypting the 4 KiB sector;
 * OpenSSL's EVP API can re-initialise just the tweak of a keyed context.
 * This module keys a context once per volume key (Key), reuses copies of
 * it, and walks a whole run per call with the GIL released.  Reading from a
 * file it passes holes through: a data unit that is all zero bytes on disk
 * was never written (a hole of a sparse volume file), and reads as zeros.
 *
 * pread and pwrite do a request's file I/O and its crypto in one call and
 * one release of the GIL, decrypting in place in the bytes they return: no
 * second buffer, and none of the Python a call to os.pread or os.pwrite and
 * a separate crypt() would run per request.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>

#define XTS_TWEAK_SIZE 16

/* Whether len > 0 bytes at p are all zero: the first byte, then each byte
 * against the one before it.  Ciphertext fails at its first byte. */
static int xts_all_zero(const unsigned char *p, Py_ssize_t len)
{
	return !p[0] && !memcmp(p, p + 1, len - 1);
}

/* Fetched once: an implicit fetch on every EVP_CipherInit is slow. */
static EVP_CIPHER *xts_aes128;
static EVP_CIPHER *xts_aes256;

/* Copies kept for reuse per direction: one per thread that may be inside
 * crypt() at once (storaged: a thread per connection plus its pool). */
#define XTS_SPARES 8

/* A volume key, expanded once into a decrypting and an encrypting context.
 * A call works on a copy of one (it only ever sets the tweak), and the copy
 * is kept for the next call: keying a context per call cost two AES key
 * expansions and a provider round trip, copying one a pair of allocations,
 * each more than the XTS of a 4 KiB sector on the host.  The keyed contexts
 * are only read after creation. */
typedef struct {
	PyObject_HEAD
	EVP_CIPHER_CTX *keyed[2];	/* [encrypt]: 0 decrypts, 1 encrypts */
	/* protected by the GIL: taken before a call releases it, put back after */
	EVP_CIPHER_CTX *spare[2][XTS_SPARES];
	int spares[2];
} XtsKey;

/* A copy of the keyed context to use without the GIL (GIL held). */
static EVP_CIPHER_CTX *xts_key_take(XtsKey *self, int encrypt)
{
	EVP_CIPHER_CTX *ctx;

	if (self->spares[encrypt])
		return self->spare[encrypt][--self->spares[encrypt]];
	ctx = EVP_CIPHER_CTX_new();
	if (ctx && !EVP_CIPHER_CTX_copy(ctx, self->keyed[encrypt])) {
		EVP_CIPHER_CTX_free(ctx);
		ctx = NULL;
	}
	return ctx;
}

/* Keep @ctx for the next call, or free it if enough are kept (GIL held). */
static void xts_key_put(XtsKey *self, int encrypt, EVP_CIPHER_CTX *ctx)
{
	if (self->spares[encrypt] < XTS_SPARES)
		self->spare[encrypt][self->spares[encrypt]++] = ctx;
	else
		EVP_CIPHER_CTX_free(ctx);
}

/* Returns 0, or -1 with *why set; runs without the GIL. */
static int xts_run(EVP_CIPHER_CTX *ctx, const unsigned char *in,
		   unsigned char *out, Py_ssize_t len, Py_ssize_t unit,
		   uint64_t tweak, uint64_t step, int encrypt, int keep_holes,
		   const char **why)
{
	unsigned char iv[XTS_TWEAK_SIZE] = { 0 };
	Py_ssize_t pos;
	int out_len, i;

	for (pos = 0; pos < len; pos += unit, tweak += step) {
		if (keep_holes && xts_all_zero(in + pos, unit)) {
			memset(out + pos, 0, unit);
			continue;
		}
		for (i = 0; i < 8; i++)
			iv[i] = (unsigned char)(tweak >> (8 * i));
		if (!EVP_CipherInit_ex2(ctx, NULL, NULL, iv, encrypt, NULL) ||
		    !EVP_CipherUpdate(ctx, out + pos, &out_len, in + pos,
				      (int)unit)) {
			*why = "OpenSSL refused an AES-XTS data unit";
			return -1;
		}
	}
	return 0;
}

static void xts_key_dealloc(XtsKey *self)
{
	int encrypt;

	for (encrypt = 0; encrypt < 2; encrypt++)
		while (self->spares[encrypt])
			EVP_CIPHER_CTX_free(
				self->spare[encrypt][--self->spares[encrypt]]);
	EVP_CIPHER_CTX_free(self->keyed[1]);
	EVP_CIPHER_CTX_free(self->keyed[0]);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *xts_key_new(PyTypeObject *type, PyObject *args,
			     PyObject *kwargs)
{
	static char *keywords[] = { "key", NULL };
	Py_buffer key;
	XtsKey *self = NULL;
	int encrypt;

	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*:Key", keywords,
					 &key))
		return NULL;
	if (key.len != 32 && key.len != 64) {
		PyErr_Format(PyExc_ValueError,
			     "AES-XTS needs a 256- or 512-bit key, got %zd bits",
			     key.len * 8);
		goto release;
	}
	self = (XtsKey *)type->tp_alloc(type, 0);
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

/*
 * A context for a run of @len bytes in @unit-byte data units, or NULL with
 * ValueError (not such a run) or MemoryError set (GIL held).
 */
static EVP_CIPHER_CTX *xts_key_take_for(XtsKey *self, int encrypt,
					Py_ssize_t len, Py_ssize_t unit)
{
	EVP_CIPHER_CTX *ctx;

	if (len < 0 || unit < XTS_TWEAK_SIZE || unit > INT_MAX ||
	    len % unit) {
		PyErr_Format(PyExc_ValueError,
			     "%zd bytes is not a run of %zd-byte data units",
			     len, unit);
		return NULL;
	}
	ctx = xts_key_take(self, encrypt);
	if (!ctx)
		PyErr_SetString(PyExc_MemoryError,
				"OpenSSL could not copy the AES-XTS context");
	return ctx;
}

/* Fill @len bytes from @fd at @pos, zeros past the end of the file.
 * Returns 0 or an errno; runs without the GIL. */
static int xts_pread_all(int fd, unsigned char *buf, Py_ssize_t len,
			 long long pos)
{
	ssize_t got;

	while (len) {
		got = pread(fd, buf, len, pos);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			return errno;
		if (!got) {
			memset(buf, 0, len);
			return 0;
		}
		buf += got;
		len -= got;
		pos += got;
	}
	return 0;
}

/* Write @len bytes to @fd at @pos.  Returns 0 or an errno; runs without
 * the GIL. */
static int xts_pwrite_all(int fd, const unsigned char *buf, Py_ssize_t len,
			  long long pos)
{
	ssize_t put;

	while (len) {
		put = pwrite(fd, buf, len, pos);
		if (put < 0 && errno == EINTR)
			continue;
		if (put < 0)
			return errno;
		buf += put;
		len -= put;
		pos += put;
	}
	return 0;
}

/*
 * After a run without the GIL: put @ctx back, or, if the crypto failed
 * (@why set), free it (its state is unknown).  @io_err is an errno from the
 * file I/O.  Returns 0, or -1 with the exception set (GIL held).
 */
static int xts_key_end_run(XtsKey *self, int encrypt, EVP_CIPHER_CTX *ctx,
			   int io_err, const char *why)
{
	if (why) {
		EVP_CIPHER_CTX_free(ctx);
		PyErr_SetString(PyExc_RuntimeError, why);
		return -1;
	}
	xts_key_put(self, encrypt, ctx);
	if (io_err) {
		errno = io_err;
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	return 0;
}

PyDoc_STRVAR(xts_key_crypt_doc,
"crypt(data, unit_size, first_tweak, tweak_step, encrypt) -> bytes\n\n"
"En- or decrypt data, a run of unit_size-byte data units; unit k has the\n"
"64-bit tweak first_tweak + k * tweak_step (little-endian, zero-padded to\n"
"16 bytes).");

static PyObject *xts_key_crypt(XtsKey *self, PyObject *args)
{
	Py_buffer data;
	Py_ssize_t unit;
	unsigned long long tweak, step;
	int encrypt;
	const char *why = NULL;
	PyObject *result = NULL;
	EVP_CIPHER_CTX *ctx;

	if (!PyArg_ParseTuple(args, "y*nKKp:crypt", &data, &unit, &tweak,
			      &step, &encrypt))
		return NULL;
	ctx = xts_key_take_for(self, encrypt, data.len, unit);
	if (!ctx)
		goto release;
	result = PyBytes_FromStringAndSize(NULL, data.len);
	if (!result) {
		xts_key_put(self, encrypt, ctx);
		goto release;
	}
	Py_BEGIN_ALLOW_THREADS
	xts_run(ctx, data.buf, (unsigned char *)PyBytes_AS_STRING(result),
		data.len, unit, tweak, step, encrypt, 0, &why);
	Py_END_ALLOW_THREADS
	if (xts_key_end_run(self, encrypt, ctx, 0, why))
		Py_CLEAR(result);
release:
	PyBuffer_Release(&data);
	return result;
}

PyDoc_STRVAR(xts_key_pread_doc,
"pread(fd, position, length, unit_size, first_tweak, tweak_step) -> bytes\n\n"
"Read length bytes at position in file descriptor fd and decrypt them as\n"
"crypt() would, in one release of the GIL.  A unit of all zero bytes (a\n"
"hole) and bytes past the end of the file read as zeros.  Raises OSError\n"
"as os.pread does.");

static PyObject *xts_key_pread(XtsKey *self, PyObject *args)
{
	int fd, io_err = 0;
	long long pos;
	Py_ssize_t len, unit;
	unsigned long long tweak, step;
	const char *why = NULL;
	unsigned char *buf;
	PyObject *result;
	EVP_CIPHER_CTX *ctx;

	if (!PyArg_ParseTuple(args, "iLnnKK:pread", &fd, &pos, &len, &unit,
			      &tweak, &step))
		return NULL;
	ctx = xts_key_take_for(self, 0, len, unit);
	if (!ctx)
		return NULL;
	result = PyBytes_FromStringAndSize(NULL, len);
	if (!result) {
		xts_key_put(self, 0, ctx);
		return NULL;
	}
	buf = (unsigned char *)PyBytes_AS_STRING(result);
	Py_BEGIN_ALLOW_THREADS
	io_err = xts_pread_all(fd, buf, len, pos);
	if (!io_err)	/* in place: OpenSSL allows out == in */
		xts_run(ctx, buf, buf, len, unit, tweak, step, 0, 1, &why);
	Py_END_ALLOW_THREADS
	if (xts_key_end_run(self, 0, ctx, io_err, why))
		Py_CLEAR(result);
	return result;
}

PyDoc_STRVAR(xts_key_pwrite_doc,
"pwrite(fd, position, data, unit_size, first_tweak, tweak_step) -> None\n\n"
"Encrypt data as crypt() would and write all of it at position in file\n"
"descriptor fd, in one release of the GIL.  Raises OSError as os.pwrite\n"
"does; a short write is retried.");

static PyObject *xts_key_pwrite(XtsKey *self, PyObject *args)
{
	Py_buffer data;
	int fd, io_err = 0;
	long long pos;
	Py_ssize_t unit;
	unsigned long long tweak, step;
	const char *why = NULL;
	unsigned char *buf;
	PyObject *result = NULL;
	EVP_CIPHER_CTX *ctx;

	if (!PyArg_ParseTuple(args, "iLy*nKK:pwrite", &fd, &pos, &data, &unit,
			      &tweak, &step))
		return NULL;
	ctx = xts_key_take_for(self, 1, data.len, unit);
	if (!ctx)
		goto release;
	buf = PyMem_RawMalloc(data.len ? data.len : 1);
	if (!buf) {
		PyErr_NoMemory();
		xts_key_put(self, 1, ctx);
		goto release;
	}
	Py_BEGIN_ALLOW_THREADS
	if (!xts_run(ctx, data.buf, buf, data.len, unit, tweak, step, 1, 0,
		     &why))
		io_err = xts_pwrite_all(fd, buf, data.len, pos);
	Py_END_ALLOW_THREADS
	PyMem_RawFree(buf);
	if (!xts_key_end_run(self, 1, ctx, io_err, why))
		result = Py_NewRef(Py_None);
release:
	PyBuffer_Release(&data);
	return result;
}

static PyMethodDef xts_key_methods[] = {
	{ "crypt", (PyCFunction)xts_key_crypt, METH_VARARGS,
	  xts_key_crypt_doc },
	{ "pread", (PyCFunction)xts_key_pread, METH_VARARGS,
	  xts_key_pread_doc },
	{ "pwrite", (PyCFunction)xts_key_pwrite, METH_VARARGS,
	  xts_key_pwrite_doc },
	{ NULL, NULL, 0, NULL },
};

PyDoc_STRVAR(xts_key_doc,
"Key(key)\n\n"
"An AES-XTS key (32 or 64 bytes), expanded once for every later crypt().");

static PyTypeObject xts_key_type = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "storaged._xts.Key",
	.tp_doc = xts_key_doc,
	.tp_basicsize = sizeof(XtsKey),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = xts_key_new,
	.tp_dealloc = (destructor)xts_key_dealloc,
	.tp_methods = xts_key_methods,
};

static struct PyModuleDef xts_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "storaged._xts",
	.m_doc = "AES-XTS over runs of data units (OpenSSL EVP).",
	.m_size = -1,
};

PyMODINIT_FUNC PyInit__xts(void)
{
	PyObject *module;

	if (!xts_aes128)
		xts_aes128 = EVP_CIPHER_fetch(NULL, "AES-128-XTS", NULL);
	if (!xts_aes256)
		xts_aes256 = EVP_CIPHER_fetch(NULL, "AES-256-XTS", NULL);
	if (!xts_aes128 || !xts_aes256) {
		PyErr_SetString(PyExc_ImportError,
				"OpenSSL offers no AES-XTS cipher");
		return NULL;
	}
	if (PyType_Ready(&xts_key_type) < 0)
		return NULL;
	module = PyModule_Create(&xts_module);
	if (!module)
		return NULL;
	if (PyModule_AddObjectRef(module, "Key", (PyObject *)&xts_key_type)) {
		Py_DECREF(module);
		return NULL;
	}
	return module;
}
