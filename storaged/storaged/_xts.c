// SPDX-License-Identifier: GPL-2.0
/*
 * storaged._xts: AES-XTS over a run of data units, each with its own tweak,
 * in one call.
 *
 * A LUKS2 sector is an XTS data unit whose tweak is its plain64 IV.  Python
 * crypto libraries can only change an XTS tweak by building a new cipher
 * context per sector, which costs more than encrypting the 4 KiB sector;
 * OpenSSL's EVP API can re-initialise just the tweak of a keyed context.
 * This module keys one context per call and walks the whole run with the
 * GIL released.  Decrypting, it can also pass holes through: a data unit
 * that is all zero bytes on disk was never written (a hole of a sparse
 * volume file), and reads as zeros.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

/* Returns 0, or -1 with *why set; runs without the GIL. */
static int xts_run(const unsigned char *key, Py_ssize_t key_len,
		   const unsigned char *in, unsigned char *out, Py_ssize_t len,
		   Py_ssize_t unit, uint64_t tweak, uint64_t step, int encrypt,
		   int keep_holes, const char **why)
{
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	unsigned char iv[XTS_TWEAK_SIZE] = { 0 };
	Py_ssize_t pos;
	int out_len, i, ret = -1;

	if (!ctx) {
		*why = "EVP_CIPHER_CTX_new failed";
		return -1;
	}
	if (!EVP_CipherInit_ex2(ctx, key_len == 64 ? xts_aes256 : xts_aes128,
				key, NULL, encrypt, NULL)) {
		*why = "OpenSSL refused the AES-XTS key";
		goto free_ctx;
	}
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
			goto free_ctx;
		}
	}
	ret = 0;
free_ctx:
	EVP_CIPHER_CTX_free(ctx);
	return ret;
}

PyDoc_STRVAR(xts_crypt_doc,
"crypt(key, data, unit_size, first_tweak, tweak_step, encrypt, keep_holes)\n"
"-> bytes\n\n"
"En- or decrypt data, a run of unit_size-byte data units; unit k has the\n"
"64-bit tweak first_tweak + k * tweak_step (little-endian, zero-padded to\n"
"16 bytes). key is 32 or 64 bytes. With keep_holes (decrypting only), a\n"
"unit of all zero bytes stays zeros instead of being decrypted.");

static PyObject *xts_crypt(PyObject *Py_UNUSED(module), PyObject *args)
{
	Py_buffer key, data;
	Py_ssize_t unit;
	unsigned long long tweak, step;
	int encrypt, keep_holes, err;
	const char *why = NULL;
	PyObject *result = NULL;

	if (!PyArg_ParseTuple(args, "y*y*nKKpp:crypt", &key, &data, &unit,
			      &tweak, &step, &encrypt, &keep_holes))
		return NULL;
	if (encrypt && keep_holes) {
		PyErr_SetString(PyExc_ValueError,
				"keep_holes applies to decryption only");
		goto release;
	}
	if (key.len != 32 && key.len != 64) {
		PyErr_Format(PyExc_ValueError,
			     "AES-XTS needs a 256- or 512-bit key, got %zd bits",
			     key.len * 8);
		goto release;
	}
	if (unit < XTS_TWEAK_SIZE || unit > INT_MAX || data.len % unit) {
		PyErr_Format(PyExc_ValueError,
			     "%zd bytes is not a run of %zd-byte data units",
			     data.len, unit);
		goto release;
	}
	result = PyBytes_FromStringAndSize(NULL, data.len);
	if (!result)
		goto release;
	Py_BEGIN_ALLOW_THREADS
	err = xts_run(key.buf, key.len, data.buf,
		      (unsigned char *)PyBytes_AS_STRING(result), data.len,
		      unit, tweak, step, encrypt, keep_holes, &why);
	Py_END_ALLOW_THREADS
	if (err) {
		Py_CLEAR(result);
		PyErr_SetString(PyExc_RuntimeError, why);
	}
release:
	PyBuffer_Release(&data);
	PyBuffer_Release(&key);
	return result;
}

static PyMethodDef xts_methods[] = {
	{ "crypt", xts_crypt, METH_VARARGS, xts_crypt_doc },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef xts_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "storaged._xts",
	.m_doc = "AES-XTS over runs of data units (OpenSSL EVP).",
	.m_size = -1,
	.m_methods = xts_methods,
};

PyMODINIT_FUNC PyInit__xts(void)
{
	if (!xts_aes128)
		xts_aes128 = EVP_CIPHER_fetch(NULL, "AES-128-XTS", NULL);
	if (!xts_aes256)
		xts_aes256 = EVP_CIPHER_fetch(NULL, "AES-256-XTS", NULL);
	if (!xts_aes128 || !xts_aes256) {
		PyErr_SetString(PyExc_ImportError,
				"OpenSSL offers no AES-XTS cipher");
		return NULL;
	}
	return PyModule_Create(&xts_module);
}
