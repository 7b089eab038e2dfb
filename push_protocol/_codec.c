/*
 * The compiled packet cipher: push_protocol/codec.py's `PythonCipher`, in C.
 *
 * aioquic's _crypto.c is the model: one object per key holding OpenSSL
 * contexts built once, and per packet only the nonce changes. What it saves
 * over `cryptography`'s AESGCM is the work around the AEAD, not the AEAD
 * itself: building the nonce and the header, slicing the datagram into header
 * and ciphertext and joining header and ciphertext again, each a new Python
 * object. A datagram here is built or read in one buffer.
 *
 * The layout is docs/protocol.md's: a 16-byte header (version, type, key
 * epoch, session id, counter; big endian) that is the associated data, then
 * the ciphertext and the 16-byte tag. The nonce is 4 zero bytes and the
 * counter, big endian. `PythonCipher` is the reference: tests/test_codec_compiled.py
 * shows both give the same bytes for the same input and refuse the same
 * datagrams.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/evp.h>

#define HEADER_LEN 16
#define TAG_LEN 16
#define NONCE_LEN 12
#define KEY_LEN 32
#define PROTOCOL_VERSION 1
#define DATA_TYPE 1

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *seal_ctx;
    EVP_CIPHER_CTX *open_ctx;
} CipherObject;

static void put_u16(unsigned char *out, unsigned int value) {
    out[0] = (unsigned char)(value >> 8);
    out[1] = (unsigned char)value;
}

static void put_u32(unsigned char *out, unsigned long value) {
    for (int i = 3; i >= 0; i--) {
        out[i] = (unsigned char)value;
        value >>= 8;
    }
}

static void put_u64(unsigned char *out, unsigned long long value) {
    for (int i = 7; i >= 0; i--) {
        out[i] = (unsigned char)value;
        value >>= 8;
    }
}

static void write_header(unsigned char *out, unsigned int packet_type, unsigned int key_epoch,
                         unsigned long session_id, unsigned long long counter) {
    out[0] = PROTOCOL_VERSION;
    out[1] = (unsigned char)packet_type;
    put_u16(out + 2, key_epoch);
    put_u32(out + 4, session_id);
    put_u64(out + 8, counter);
}

static void nonce_for(unsigned char *nonce, unsigned long long counter) {
    memset(nonce, 0, 4);
    put_u64(nonce + 4, counter);
}

static EVP_CIPHER_CTX *new_context(const EVP_CIPHER *cipher, const unsigned char *key, int seal) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NULL;
    if (!EVP_CipherInit_ex(ctx, cipher, NULL, NULL, NULL, seal) ||
        !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, NONCE_LEN, NULL) ||
        !EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL, seal)) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static int Cipher_init(CipherObject *self, PyObject *args, PyObject *kwargs) {
    const char *suite;
    Py_buffer key;
    static char *keywords[] = {"suite", "key", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sy*", keywords, &suite, &key))
        return -1;
    const EVP_CIPHER *cipher = NULL;
    if (strcmp(suite, "aes-256-gcm") == 0)
        cipher = EVP_aes_256_gcm();
    else if (strcmp(suite, "chacha20-poly1305") == 0)
        cipher = EVP_chacha20_poly1305();
    if (cipher == NULL) {
        PyErr_Format(PyExc_ValueError, "unknown cipher suite %R", PyTuple_GET_ITEM(args, 0));
        PyBuffer_Release(&key);
        return -1;
    }
    if (key.len != KEY_LEN) {
        PyErr_Format(PyExc_ValueError, "a %d-byte key is needed, got %zd bytes", KEY_LEN, key.len);
        PyBuffer_Release(&key);
        return -1;
    }
    EVP_CIPHER_CTX_free(self->seal_ctx);  /* __init__ called twice */
    EVP_CIPHER_CTX_free(self->open_ctx);
    self->seal_ctx = new_context(cipher, key.buf, 1);
    self->open_ctx = new_context(cipher, key.buf, 0);
    PyBuffer_Release(&key);
    if (self->seal_ctx == NULL || self->open_ctx == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not build the cipher context");
        return -1;
    }
    return 0;
}

static void Cipher_dealloc(CipherObject *self) {
    EVP_CIPHER_CTX_free(self->seal_ctx);
    EVP_CIPHER_CTX_free(self->open_ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* header | ciphertext | tag for `payload`, or NULL with an exception set. */
static PyObject *seal_one(CipherObject *self, unsigned int packet_type, unsigned int key_epoch,
                          unsigned long session_id, unsigned long long counter,
                          const unsigned char *payload, Py_ssize_t length) {
    if (self->seal_ctx == NULL) {
        PyErr_SetString(PyExc_ValueError, "cipher not initialised");
        return NULL;
    }
    if (length > INT_MAX - HEADER_LEN - TAG_LEN) {
        PyErr_SetString(PyExc_OverflowError, "payload too long");
        return NULL;
    }
    PyObject *datagram = PyBytes_FromStringAndSize(NULL, HEADER_LEN + length + TAG_LEN);
    if (datagram == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(datagram);
    unsigned char nonce[NONCE_LEN];
    int written, final;
    write_header(out, packet_type, key_epoch, session_id, counter);
    nonce_for(nonce, counter);
    EVP_CIPHER_CTX *ctx = self->seal_ctx;
    if (!EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 1) ||
        !EVP_CipherUpdate(ctx, NULL, &written, out, HEADER_LEN) ||
        (length && !EVP_CipherUpdate(ctx, out + HEADER_LEN, &written, payload, (int)length)) ||
        !EVP_CipherFinal_ex(ctx, out + HEADER_LEN + length, &final) ||
        !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, out + HEADER_LEN + length)) {
        Py_DECREF(datagram);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to seal");
        return NULL;
    }
    return datagram;
}

static int read_fields(PyObject *const *args, unsigned int *key_epoch, unsigned long *session_id,
                       unsigned long long *counter) {
    unsigned long epoch = PyLong_AsUnsignedLong(args[0]);
    if (epoch == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    unsigned long session = PyLong_AsUnsignedLong(args[1]);
    if (session == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    unsigned long long value = PyLong_AsUnsignedLongLong(args[2]);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (epoch > 0xFFFF || session > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_OverflowError, "key epoch or session id out of range");
        return -1;
    }
    *key_epoch = (unsigned int)epoch;
    *session_id = session;
    *counter = value;
    return 0;
}

PyDoc_STRVAR(Cipher_seal_doc,
             "seal(packet_type, key_epoch, session_id, counter, payload) -> bytes\n\n"
             "The datagram carrying `payload` (codec.PythonCipher.seal).");

static PyObject *Cipher_seal(CipherObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "seal takes 5 arguments");
        return NULL;
    }
    unsigned long packet_type = PyLong_AsUnsignedLong(args[0]);
    if (packet_type == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (packet_type > 0xFF) {
        PyErr_SetString(PyExc_OverflowError, "packet type out of range");
        return NULL;
    }
    unsigned int key_epoch;
    unsigned long session_id;
    unsigned long long counter;
    if (read_fields(args + 1, &key_epoch, &session_id, &counter) < 0)
        return NULL;
    Py_buffer payload;
    if (PyObject_GetBuffer(args[4], &payload, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *datagram = seal_one(self, (unsigned int)packet_type, key_epoch, session_id, counter,
                                  payload.buf, payload.len);
    PyBuffer_Release(&payload);
    return datagram;
}

PyDoc_STRVAR(Cipher_seal_many_doc,
             "seal_many(key_epoch, session_id, first_counter, payloads) -> list[bytes]\n\n"
             "One DATA datagram per payload, counters from `first_counter` up\n"
             "(codec.PythonCipher.seal_many).");

static PyObject *Cipher_seal_many(CipherObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "seal_many takes 4 arguments");
        return NULL;
    }
    unsigned int key_epoch;
    unsigned long session_id;
    unsigned long long counter;
    if (read_fields(args, &key_epoch, &session_id, &counter) < 0)
        return NULL;
    PyObject *payloads = PySequence_Fast(args[3], "payloads must be a sequence");
    if (payloads == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(payloads);
    PyObject *datagrams = PyList_New(count);
    if (datagrams == NULL) {
        Py_DECREF(payloads);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_buffer payload;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(payloads, i), &payload, PyBUF_SIMPLE) < 0)
            goto fail;
        PyObject *datagram = NULL;
        if (payload.len == 0)
            PyErr_SetString(PyExc_ValueError, "data packets carry a payload");
        else
            datagram = seal_one(self, DATA_TYPE, key_epoch, session_id, counter + (unsigned long long)i,
                                payload.buf, payload.len);
        PyBuffer_Release(&payload);
        if (datagram == NULL)
            goto fail;
        PyList_SET_ITEM(datagrams, i, datagram);
    }
    Py_DECREF(payloads);
    return datagrams;
fail:
    Py_DECREF(payloads);
    Py_DECREF(datagrams);
    return NULL;
}

PyDoc_STRVAR(Cipher_open_doc,
             "open(datagram, counter) -> bytes | None\n\n"
             "The payload of a datagram whose header was read, or None if it does not\n"
             "authenticate, as one too short to hold a header and a tag never does\n"
             "(codec.PythonCipher.open).");

static PyObject *Cipher_open(CipherObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "open takes 2 arguments");
        return NULL;
    }
    if (self->open_ctx == NULL) {
        PyErr_SetString(PyExc_ValueError, "cipher not initialised");
        return NULL;
    }
    unsigned long long counter = PyLong_AsUnsignedLongLong(args[1]);
    if (counter == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_buffer datagram;
    if (PyObject_GetBuffer(args[0], &datagram, PyBUF_SIMPLE) < 0)
        return NULL;
    if (datagram.len < HEADER_LEN + TAG_LEN || datagram.len > INT_MAX) {
        PyBuffer_Release(&datagram);  /* too short for a header and a tag: never authentic */
        Py_RETURN_NONE;
    }
    const unsigned char *in = datagram.buf;
    Py_ssize_t length = datagram.len - HEADER_LEN - TAG_LEN;
    PyObject *payload = PyBytes_FromStringAndSize(NULL, length);
    if (payload == NULL) {
        PyBuffer_Release(&datagram);
        return NULL;
    }
    unsigned char nonce[NONCE_LEN], tag[TAG_LEN];
    int written, final;
    nonce_for(nonce, counter);
    memcpy(tag, in + HEADER_LEN + length, TAG_LEN);
    EVP_CIPHER_CTX *ctx = self->open_ctx;
    int authentic =
        EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 0) &&
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, tag) &&
        EVP_CipherUpdate(ctx, NULL, &written, in, HEADER_LEN) &&
        (length == 0 ||
         EVP_CipherUpdate(ctx, (unsigned char *)PyBytes_AS_STRING(payload), &written,
                          in + HEADER_LEN, (int)length)) &&
        EVP_CipherFinal_ex(ctx, NULL, &final) > 0;
    PyBuffer_Release(&datagram);
    if (!authentic) {
        Py_DECREF(payload);
        Py_RETURN_NONE;
    }
    return payload;
}

static PyMethodDef Cipher_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))Cipher_seal, METH_FASTCALL, Cipher_seal_doc},
    {"seal_many", (PyCFunction)(void (*)(void))Cipher_seal_many, METH_FASTCALL,
     Cipher_seal_many_doc},
    {"open", (PyCFunction)(void (*)(void))Cipher_open, METH_FASTCALL, Cipher_open_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CipherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "push_protocol._codec.Cipher",
    .tp_doc = PyDoc_STR("Cipher(suite, key): seals and opens push datagrams under one key."),
    .tp_basicsize = sizeof(CipherObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Cipher_init,
    .tp_dealloc = (destructor)Cipher_dealloc,
    .tp_methods = Cipher_methods,
};

static struct PyModuleDef codec_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "push_protocol._codec",
    .m_doc = "The compiled packet cipher (push_protocol/codec.py has the reference).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__codec(void) {
    if (PyType_Ready(&CipherType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&codec_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&CipherType);
    if (PyModule_AddObject(module, "Cipher", (PyObject *)&CipherType) < 0) {
        Py_DECREF(&CipherType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
