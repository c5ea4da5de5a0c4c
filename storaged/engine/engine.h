/* SPDX-License-Identifier: GPL-2.0 */
/*
 * storaged._engine: storaged's request engine, private header.
 *
 * One extension module, split by concern the way kmod/ is:
 *
 *   frame.c       request framing and validation (the only implementation),
 *                 the in-flight handle set, the Scanner type
 *   exec.c        a batch of requests run against a volume: run(), flush()
 *   xts.c         AES-XTS with dm-crypt's plain64 tweaks, the Key type
 *   store.c       the store interface's Python face, the Store base type
 *   store_file.c  the file store: pread/pwrite, fdatasync, punched holes
 *   store_rbd.c   the RBD store: librbd's aio calls, managed locks
 *   volume.c      a LUKS2 data segment on a store, the Volume type
 *   stats.c       request counters and latency histograms, Counters
 *   module.c      the module and its types
 *
 * The pieces call each other through the prototypes below, with C types;
 * Python sees only the types and the two functions of module.c.
 */
#ifndef STORAGED_ENGINE_H
#define STORAGED_ENGINE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>

#include <openssl/evp.h>

#include <linux/netblk.h>

/* plain64 counts 512-byte units whatever the sector size */
#define ENG_IV_UNIT 512
/* room for a refusal's reason, as docs/protocol.md's examples read */
#define ENG_REASON_MAX 112
/* latency buckets are powers of two of microseconds: 1 us .. ~68 s */
#define ENG_LATENCY_BUCKETS 27
/* the opcodes linux/netblk.h defines */
#define ENG_OPCODES (NETBLK_CMD_DISCONNECT + 1)

/* ---- frame.c ---------------------------------------------------------- */

/* What a client was admitted to: requests are checked against it. */
struct eng_geometry {
	uint64_t size;		/* bytes of the export */
	uint32_t export_flags;	/* NETBLK_EXPORT_*, as offered to this client */
	uint32_t max_payload;	/* largest READ or WRITE */
};

/* A set of 64-bit handles (open addressing, grows as needed). */
struct eng_handles {
	uint64_t *keys;
	uint8_t *used;
	size_t mask;		/* slots - 1; slots is a power of two */
	size_t count;
};

enum eng_frame_kind {
	ENG_FRAME_SHORT,	/* incomplete: more bytes are needed */
	ENG_FRAME_REQUEST,	/* valid: run it */
	ENG_FRAME_INVALID,	/* well framed, refused with ->error */
	ENG_FRAME_DISCONNECT,	/* the client ends the session */
	ENG_FRAME_BROKEN,	/* framing broken: close the connection */
};

/* One request frame as scanned from the receive buffer. */
struct eng_frame {
	enum eng_frame_kind kind;
	uint16_t opcode;
	uint16_t flags;
	uint64_t handle;
	uint64_t offset;
	uint32_t length;
	size_t size;			/* bytes it takes in the stream */
	unsigned char *payload;		/* a WRITE's data, in the buffer */
	uint32_t error;			/* NETBLK_E*, for INVALID */
	char reason[ENG_REASON_MAX];	/* for INVALID and BROKEN */
};

/* A connection's request side: what it may do, what is in flight. */
typedef struct {
	PyObject_HEAD
	struct eng_geometry geometry;
	/* protected by the GIL: the session's thread and the pool's flushes */
	struct eng_handles inflight;
} EngScanner;

extern PyTypeObject eng_scanner_type;

void eng_frame_scan(const EngScanner *scanner, unsigned char *p,
		    size_t avail, struct eng_frame *frame);
bool eng_frame_ranged(uint16_t opcode);
bool eng_frame_mutating(uint16_t opcode);
int eng_handles_add(struct eng_handles *set, uint64_t handle);
void eng_handles_remove(struct eng_handles *set, uint64_t handle);
void eng_reply_header(unsigned char *out, uint64_t handle, uint32_t error);

/* ---- xts.c ------------------------------------------------------------ */

/* Copies of a keyed context kept per direction for reuse. */
#define ENG_XTS_SPARES 8

/* A volume key, expanded once into a decrypting and an encrypting
 * context; calls work on copies (they only set the tweak). */
typedef struct {
	PyObject_HEAD
	EVP_CIPHER_CTX *keyed[2];	/* [encrypt]: 0 decrypts, 1 encrypts */
	/* protected by the GIL: taken before a run releases it, put back
	 * after */
	EVP_CIPHER_CTX *spare[2][ENG_XTS_SPARES];
	int spares[2];
} EngKey;

extern PyTypeObject eng_key_type;

int eng_xts_setup(void);
EVP_CIPHER_CTX *eng_key_take(EngKey *key, int encrypt);
void eng_key_put(EngKey *key, int encrypt, EVP_CIPHER_CTX *ctx);
int eng_xts_run(EVP_CIPHER_CTX *ctx, unsigned char *buf, size_t len,
		size_t unit, uint64_t tweak, uint64_t step, int encrypt,
		bool keep_holes);

/* ---- store.c: the store interface ------------------------------------- */

enum eng_io_op {
	ENG_IO_READ,
	ENG_IO_WRITE,
	ENG_IO_DISCARD,		/* deallocate: reads back as zeros */
	ENG_IO_WRITE_ZEROES,	/* zero, allocation the store's choice */
	ENG_IO_FLUSH,		/* make every completed write durable */
};

/* One operation on a store, addressed in bytes of the store. */
struct eng_io {
	enum eng_io_op op;
	uint64_t offset;
	uint64_t length;
	unsigned char *buf;	/* READ fills it, WRITE writes it */
	int error;		/* 0 or an errno, once done */
	bool done;
	void *pending;		/* the store's own, while in flight */
};

struct eng_store;

/**
 * struct eng_store_ops - what a backing store does
 * @name: what logs and errors call it ("file")
 * @submit: start @io (any op above); a synchronous store finishes it,
 *	setting ->error and ->done, before it returns
 * @wait: return once every io of @ios that was submitted is done; NULL
 *	for a store that finishes each io in @submit
 * @size: the bytes the store holds, or -errno
 * @release: free the store (no io is in flight)
 *
 * A batch is submitted as a whole, then waited for as a whole.  Every
 * operation runs without the GIL and may be called from several threads
 * at once.
 */
struct eng_store_ops {
	const char *name;
	void (*submit)(struct eng_store *store, struct eng_io *io);
	void (*wait)(struct eng_store *store, struct eng_io *ios,
		     size_t count);
	int64_t (*size)(struct eng_store *store);
	void (*release)(struct eng_store *store);
};

struct eng_store {
	const struct eng_store_ops *ops;
	bool writable;
	uint64_t syncs;		/* flushes that succeeded (atomic) */
	bool fenced;		/* refused for good: another took over (atomic) */
};

/* The Python face of a store; subtypes (FileStore) set ->store. */
typedef struct {
	PyObject_HEAD
	struct eng_store *store;
} EngStore;

extern PyTypeObject eng_store_type;

void eng_store_run(struct eng_store *store, struct eng_io *ios,
		   size_t count);

/* ---- store_file.c ----------------------------------------------------- */

extern PyTypeObject eng_file_store_type;

/* ---- store_rbd.c ------------------------------------------------------ */

extern PyTypeObject eng_rbd_store_type;

/* ---- volume.c --------------------------------------------------------- */

/* A LUKS2 data segment on a store: where it lies and how it is sealed. */
typedef struct {
	PyObject_HEAD
	EngStore *store;
	EngKey *key;
	uint64_t data_offset;	/* store bytes before the segment */
	uint64_t size;		/* bytes of the segment */
	uint32_t sector_size;	/* an XTS data unit */
	uint64_t iv_tweak;	/* plain64 units before the segment's first */
	bool writable;
} EngVolume;

extern PyTypeObject eng_volume_type;

uint64_t eng_volume_tweak(const EngVolume *volume, uint64_t offset);

/* ---- stats.c ---------------------------------------------------------- */

/* What happened on one (export, client) pair. */
struct eng_counts {
	uint64_t requests[ENG_OPCODES];
	uint64_t refused;
	uint64_t bytes_read;
	uint64_t bytes_written;
	uint64_t errors;
	uint64_t latency[ENG_LATENCY_BUCKETS];
	uint64_t count;		/* requests timed */
	uint64_t total_us;
	uint64_t max_us;
};

typedef struct {
	PyObject_HEAD
	struct eng_counts counts;	/* protected by the GIL */
} EngCounters;

extern PyTypeObject eng_counters_type;

void eng_count_request(struct eng_counts *counts, uint16_t opcode,
		       uint32_t length, uint32_t error, double seconds);
void eng_count_refusal(struct eng_counts *counts);

/* ---- exec.c ----------------------------------------------------------- */

/* Why run() ended a batch: the Python shell's next step. */
enum eng_stop {
	ENG_STOP_FULL,		/* room used up, or a conflict: run again */
	ENG_STOP_SHORT,		/* a frame not yet whole: receive */
	ENG_STOP_FLUSH,		/* a FLUSH, taken: flush() it on the pool */
	ENG_STOP_DISCONNECT,	/* taken: flush and close */
	ENG_STOP_BROKEN,	/* framing broken: close */
};

PyObject *eng_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *eng_flush(PyObject *module, PyObject *const *args,
		    Py_ssize_t nargs);
extern const char eng_run_doc[];
extern const char eng_flush_doc[];

#endif /* STORAGED_ENGINE_H */
