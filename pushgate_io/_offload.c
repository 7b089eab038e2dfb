/*
 * The compiled TUN offloads: pushgate_io/gro.py's `coalesce` (the write merge)
 * and pushgate_io/tso.py's `packets`, `segments`, `complete` and `to_partial`
 * (the read cut and the partial checksum form), in C.
 *
 * gro.py and tso.py are the reference and say what is done and why; this file
 * follows them rule for rule (tests/test_offload_compiled.py shows both give
 * the same bytes). Two differences in the merge, neither visible to the
 * kernel: a merged write is two buffers (the virtio-net header, then the
 * packet: one IP and TCP or UDP header and every segment's payload in one
 * bytes object) where gro.py gives the payloads as separate buffers, and flows
 * are found through a small hash table of this batch instead of a dict.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define VNET_HDR_LEN 10
#define F_NEEDS_CSUM 1
#define GSO_TCPV4 1
#define GSO_UDP_L4 5
#define TCP_CSUM_OFFSET 16
#define UDP_CSUM_OFFSET 6
#define MAX_SEGMENTS 44
#define UDP_MAX_SEGMENTS 64
#define MAX_IP_LEN 65535
#define ACK 0x10
#define PSH 0x08
#define PROTO_TCP 6
#define PROTO_UDP 17
#define KEY_LEN 12 /* addresses and ports */
#define JOINED (-2) /* a packet that joined an earlier one's flow */

typedef struct {
    const unsigned char *key; /* into the first packet */
    int protocol;
    Py_ssize_t first;         /* packet index */
    Py_ssize_t last;          /* packet index of the last segment joined */
    Py_ssize_t header_len;
    Py_ssize_t gso_size;
    Py_ssize_t payload_bytes; /* of the segments after the first */
    int limit;
    int count;
    int psh;
    int64_t next_seq; /* TCP: the next sequence number; UDP: 0; both: -1 once closed */
} Flow;

static unsigned int be16(const unsigned char *p) { return (unsigned int)p[0] << 8 | p[1]; }

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_be16(unsigned char *p, unsigned int value) {
    p[0] = (unsigned char)(value >> 8);
    p[1] = (unsigned char)value;
}

static uint32_t fold(uint64_t value) {
    while (value >> 16)
        value = (value & 0xFFFF) + (value >> 16);
    return (uint32_t)value;
}

static PyObject *vnet_header(int flags, int gso_type, unsigned int header_len, unsigned int gso_size,
                             unsigned int csum_start, unsigned int csum_offset) {
    unsigned char header[VNET_HDR_LEN];
    uint16_t fields[4] = {(uint16_t)header_len, (uint16_t)gso_size, (uint16_t)csum_start,
                          (uint16_t)csum_offset};
    header[0] = (unsigned char)flags;
    header[1] = (unsigned char)gso_type;
    memcpy(header + 2, fields, sizeof fields); /* the host's byte order, as the TUN takes it */
    return PyBytes_FromStringAndSize((const char *)header, VNET_HDR_LEN);
}

/* tso.tcp_offset */
static Py_ssize_t tcp_offset(const unsigned char *p, Py_ssize_t length) {
    if (length < 20)
        return 0;
    int version = p[0] >> 4;
    if (version == 4) {
        Py_ssize_t ihl = (p[0] & 0x0F) << 2;
        if (p[9] == PROTO_TCP && !((p[6] & 0x3F) || p[7]) && length >= ihl + 20)
            return ihl;
    } else if (version == 6 && p[6] == PROTO_TCP && length >= 60) {
        return 40;
    }
    return 0;
}

static uint32_t hash_key(const unsigned char *key, int protocol) {
    uint32_t h = 2166136261u ^ (uint32_t)protocol;
    for (int i = 0; i < KEY_LEN; i++)
        h = (h ^ key[i]) * 16777619u;
    return h;
}

/* The slot of (key, protocol) in the open-addressing table: its flow, or empty (-1). */
static Py_ssize_t *slot_for(Py_ssize_t *table, size_t mask, const Flow *flows,
                            const unsigned char *key, int protocol) {
    size_t index = hash_key(key, protocol) & mask;
    for (;;) {
        Py_ssize_t flow = table[index];
        if (flow < 0 ||
            (flows[flow].protocol == protocol && memcmp(flows[flow].key, key, KEY_LEN) == 0))
            return &table[index];
        index = (index + 1) & mask;
    }
}

/* A merged write: [virtio-net header, header + every segment's payload]. */
static PyObject *finish(const Flow *flow, const Py_buffer *views, const Py_ssize_t *next_member) {
    Py_ssize_t header_len = flow->header_len;
    Py_ssize_t total = header_len + flow->gso_size + flow->payload_bytes;
    PyObject *data = PyBytes_FromStringAndSize(NULL, total);
    if (data == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(data);
    memcpy(out, views[flow->first].buf, views[flow->first].len);
    unsigned char *at = out + views[flow->first].len;
    for (Py_ssize_t member = next_member[flow->first]; member >= 0; member = next_member[member]) {
        Py_ssize_t size = views[member].len - header_len;
        memcpy(at, (const unsigned char *)views[member].buf + header_len, size);
        at += size;
    }
    put_be16(out + 2, (unsigned int)total);
    out[10] = out[11] = 0;
    uint64_t sum = 0;
    for (int i = 0; i < 20; i += 2)
        sum += be16(out + i);
    put_be16(out + 10, ~fold(sum) & 0xFFFF);
    Py_ssize_t l4_length = total - 20;
    uint64_t pseudo = (uint64_t)be16(out + 12) + be16(out + 14) + be16(out + 16) + be16(out + 18) +
                      (uint64_t)flow->protocol + (uint64_t)l4_length;
    int gso_type, csum_offset;
    if (flow->protocol == PROTO_TCP) {
        out[33] = (unsigned char)((out[33] & ~PSH) | flow->psh); /* as the last segment had it */
        put_be16(out + 36, fold(pseudo));
        gso_type = GSO_TCPV4;
        csum_offset = TCP_CSUM_OFFSET;
    } else {
        put_be16(out + 24, (unsigned int)l4_length);
        put_be16(out + 26, fold(pseudo));
        gso_type = GSO_UDP_L4;
        csum_offset = UDP_CSUM_OFFSET;
    }
    PyObject *vnet = vnet_header(F_NEEDS_CSUM, gso_type, (unsigned int)header_len,
                                 (unsigned int)flow->gso_size, 20, csum_offset);
    if (vnet == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    return Py_BuildValue("([NN]i)", vnet, data, flow->count);
}

static PyObject *lone(PyObject *packet, const Py_buffer *view, int partial_tcp, PyObject *plain) {
    Py_ssize_t offset = partial_tcp ? tcp_offset(view->buf, view->len) : 0;
    if (offset) {
        PyObject *header = vnet_header(F_NEEDS_CSUM, 0, 0, 0, (unsigned int)offset, TCP_CSUM_OFFSET);
        if (header == NULL)
            return NULL;
        return Py_BuildValue("([NO]i)", header, packet, 1);
    }
    return Py_BuildValue("([OO]i)", plain, packet, 1);
}

PyDoc_STRVAR(coalesce_doc,
             "coalesce(packets, udp, partial_tcp) -> list[tuple[list, int]]\n\n"
             "gro.coalesce (the reference): the TUN writes that carry `packets`.");

static PyObject *coalesce(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "coalesce takes 3 arguments");
        return NULL;
    }
    int udp = PyObject_IsTrue(args[1]);
    int partial_tcp = PyObject_IsTrue(args[2]);
    if (udp < 0 || partial_tcp < 0)
        return NULL;
    PyObject *packets = PySequence_Fast(args[0], "packets must be a sequence");
    if (packets == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(packets);
    size_t table_size = 16;
    while (table_size < (size_t)count * 2)
        table_size <<= 1;
    PyObject *result = NULL, *writes = NULL, *plain = NULL;
    Py_ssize_t viewed = 0;
    Py_buffer *views = PyMem_Calloc(count ? count : 1, sizeof(Py_buffer));
    Flow *flows = PyMem_Calloc(count ? count : 1, sizeof(Flow));
    /* per packet: the flow it opened (-1: none, JOINED: it joined one); the next segment
     * of its flow (-1: none) */
    Py_ssize_t *opened = PyMem_Malloc((count ? count : 1) * sizeof(Py_ssize_t));
    Py_ssize_t *next_member = PyMem_Malloc((count ? count : 1) * sizeof(Py_ssize_t));
    Py_ssize_t *table = PyMem_Malloc(table_size * sizeof(Py_ssize_t));
    if (!views || !flows || !opened || !next_member || !table) {
        PyErr_NoMemory();
        goto done;
    }
    memset(table, 0xFF, table_size * sizeof(Py_ssize_t)); /* every slot -1 */
    Py_ssize_t flow_count = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        opened[i] = next_member[i] = -1;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(packets, i), &views[i], PyBUF_SIMPLE) < 0)
            goto done;
        viewed++;
        const unsigned char *p = views[i].buf;
        Py_ssize_t length = views[i].len;
        if (length < 29 || p[0] != 0x45) /* IPv4 without options, with a payload */
            continue;
        int protocol = p[9];
        Py_ssize_t header_len, size;
        int64_t seq = 0;
        int flags = 0;
        if (protocol == PROTO_TCP && length >= 41) {
            unsigned int frag = be16(p + 6);
            header_len = 20 + ((p[32] >> 4) << 2);
            size = length - header_len;
            flags = p[33];
            if ((frag & 0x3FFF) || (flags & ~PSH) != ACK || size <= 0 || header_len < 40 ||
                be16(p + 2) != (unsigned int)length)
                continue;
            seq = be32(p + 24);
        } else if (protocol == PROTO_UDP && udp) {
            if ((be16(p + 6) & 0x3FFF) || be16(p + 2) != (unsigned int)length ||
                be16(p + 24) != (unsigned int)(length - 20))
                continue;
            header_len = 28;
            size = length - 28;
        } else {
            continue;
        }
        Py_ssize_t *slot = slot_for(table, table_size - 1, flows, p + 12, protocol);
        Flow *flow = *slot >= 0 ? &flows[*slot] : NULL;
        if (flow != NULL && size <= flow->gso_size && flow->count < flow->limit) {
            const unsigned char *first = views[flow->first].buf;
            int joins;
            if (protocol == PROTO_TCP)
                /* TOS, DF, TTL, ACK number, data offset, window, urgent pointer, options */
                joins = seq == flow->next_seq && p[1] == first[1] && be16(p + 6) == be16(first + 6) &&
                        p[8] == first[8] && memcmp(p + 28, first + 28, 5) == 0 &&
                        memcmp(p + 34, first + 34, 2) == 0 && memcmp(p + 38, first + 38, 2) == 0 &&
                        memcmp(p + 40, first + 40, header_len - 40) == 0;
            else /* TOS, DF, TTL */
                joins = flow->next_seq == 0 && p[1] == first[1] && be16(p + 6) == be16(first + 6) &&
                        p[8] == first[8];
            if (joins) {
                opened[i] = JOINED;
                next_member[flow->last] = i;
                flow->last = i;
                flow->count++;
                flow->payload_bytes += size;
                if (protocol == PROTO_TCP) {
                    if (size < flow->gso_size || (flags & PSH)) { /* the last this write takes */
                        flow->psh = flags & PSH;
                        flow->next_seq = -1;
                    } else {
                        flow->next_seq = (seq + size) & 0xFFFFFFFF;
                    }
                } else if (size < flow->gso_size) {
                    flow->next_seq = -1;
                }
                continue;
            }
        }
        flow = &flows[flow_count];
        flow->key = p + 12;
        flow->protocol = protocol;
        flow->first = flow->last = i;
        flow->header_len = header_len;
        flow->gso_size = size;
        flow->payload_bytes = 0;
        Py_ssize_t by_size = (MAX_IP_LEN - header_len) / size;
        int most = protocol == PROTO_TCP ? MAX_SEGMENTS : UDP_MAX_SEGMENTS;
        flow->limit = by_size < most ? (int)by_size : most;
        flow->count = 1;
        flow->psh = 0;
        if (protocol == PROTO_TCP) {
            if (flags & PSH) {
                flow->psh = PSH;
                flow->next_seq = -1;
            } else {
                flow->next_seq = (seq + size) & 0xFFFFFFFF;
            }
        } else {
            flow->next_seq = 0;
        }
        *slot = flow_count; /* replaces an earlier flow of the same key, as a dict would */
        opened[i] = flow_count++;
    }
    plain = PyBytes_FromStringAndSize(NULL, VNET_HDR_LEN);
    writes = PyList_New(0);
    if (plain == NULL || writes == NULL)
        goto done;
    memset(PyBytes_AS_STRING(plain), 0, VNET_HDR_LEN); /* no GSO, no checksum offload */
    /* in the order of each write's first packet; a segment that joined a flow is in it */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *write;
        if (opened[i] == JOINED)
            continue;
        if (opened[i] >= 0 && flows[opened[i]].count > 1)
            write = finish(&flows[opened[i]], views, next_member);
        else
            write = lone(PySequence_Fast_GET_ITEM(packets, i), &views[i], partial_tcp, plain);
        if (write == NULL || PyList_Append(writes, write) < 0) {
            Py_XDECREF(write);
            goto done;
        }
        Py_DECREF(write);
    }
    result = writes;
    writes = NULL;
done:
    for (Py_ssize_t i = 0; i < viewed; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(flows);
    PyMem_Free(opened);
    PyMem_Free(next_member);
    PyMem_Free(table);
    Py_XDECREF(plain);
    Py_XDECREF(writes);
    Py_DECREF(packets);
    return result;
}

/* -- tso.py ------------------------------------------------------------------ */

#define FIN_PSH 0x09
#define CWR 0x80

static uint64_t word_sum(const unsigned char *p, Py_ssize_t length) {
    uint64_t sum = 0;
    Py_ssize_t i = 0;
    for (; i + 1 < length; i += 2)
        sum += be16(p + i);
    if (length & 1)
        sum += (uint64_t)p[length - 1] << 8; /* a last odd byte, padded with a zero */
    return sum;
}

/* tso.ones_sum: the ones' complement sum, 0 only for all zeros */
static uint32_t ones_sum(const unsigned char *p, Py_ssize_t length) {
    uint64_t sum = word_sum(p, length);
    uint32_t folded = (uint32_t)(sum % 0xFFFF);
    return folded || !sum ? folded : 0xFFFF;
}

PyDoc_STRVAR(segments_doc,
             "segments(packet, gso_size) -> list[bytes]\n\n"
             "tso.python_segments (the reference): an IPv4 TCP super-packet cut into\n"
             "segments in the partial checksum form; [] for one that cannot be cut.");

/* The segments of the super-packet at `p` (`end` bytes): a list, empty if it
 * cannot be cut; NULL with an exception set. */
static PyObject *segments_of(const unsigned char *p, Py_ssize_t end, Py_ssize_t gso_size) {
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t offset = tcp_offset(p, end);
    if (!offset || p[0] >> 4 != 4 || gso_size <= 0)
        return out;
    Py_ssize_t header_len = offset + ((p[offset + 12] >> 4) << 2);
    if (header_len > end || header_len < offset + 20)
        return out;
    /* the IP header's sum without total length, id and checksum, which change */
    uint64_t ip_base = word_sum(p, offset) - be16(p + 2) - be16(p + 4) - be16(p + 10);
    unsigned int first_id = be16(p + 4);
    uint32_t first_seq = be32(p + offset + 4);
    int flags = p[offset + 13];
    uint64_t pseudo_base = ones_sum(p + 12, 8) + PROTO_TCP + (uint64_t)(header_len - offset);
    Py_ssize_t count = (end - header_len + gso_size - 1) / gso_size;
    for (Py_ssize_t index = 0; index < count; index++) {
        Py_ssize_t start = header_len + index * gso_size;
        Py_ssize_t size = end - start < gso_size ? end - start : gso_size;
        Py_ssize_t total = header_len + size;
        PyObject *segment = PyBytes_FromStringAndSize(NULL, total);
        if (segment == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        unsigned char *s = (unsigned char *)PyBytes_AS_STRING(segment);
        memcpy(s, p, header_len);
        memcpy(s + header_len, p + start, size);
        int segment_flags = index == count - 1 ? flags : flags & ~FIN_PSH;
        if (index)
            segment_flags &= ~CWR;
        unsigned int ip_id = (first_id + (unsigned int)index) & 0xFFFF;
        put_be16(s + 2, (unsigned int)total);
        put_be16(s + 4, ip_id);
        put_be16(s + 10, 0xFFFF - (unsigned int)((ip_base + (uint64_t)total + ip_id) % 0xFFFF));
        uint32_t seq = first_seq + (uint32_t)(start - header_len);
        s[offset + 4] = (unsigned char)(seq >> 24);
        s[offset + 5] = (unsigned char)(seq >> 16);
        s[offset + 6] = (unsigned char)(seq >> 8);
        s[offset + 7] = (unsigned char)seq;
        s[offset + 13] = (unsigned char)segment_flags;
        put_be16(s + offset + 16, fold(pseudo_base + (uint64_t)size));
        int failed = PyList_Append(out, segment);
        Py_DECREF(segment);
        if (failed) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static PyObject *segments(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "segments takes 2 arguments");
        return NULL;
    }
    Py_ssize_t gso_size = PyLong_AsSsize_t(args[1]);
    if (gso_size == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = segments_of(view.buf, view.len, gso_size);
    PyBuffer_Release(&view);
    return out;
}

/* A copy of the `length` bytes at `p` with the 2 bytes at `at` set to `value`. */
static PyObject *with_field(const void *p, Py_ssize_t length, Py_ssize_t at, unsigned int value) {
    PyObject *out = PyBytes_FromStringAndSize(p, length);
    if (out != NULL)
        put_be16((unsigned char *)PyBytes_AS_STRING(out) + at, value);
    return out;
}

/* The partial form's checksum field of the TCP packet at `p` (TCP at `offset`). */
static unsigned int partial_field(const unsigned char *p, Py_ssize_t length, Py_ssize_t offset) {
    int v6 = offset == 40 && p[0] >> 4 != 4;
    uint64_t pseudo = (uint64_t)(v6 ? ones_sum(p + 8, 32) : ones_sum(p + 12, 8)) + PROTO_TCP +
                      (uint64_t)(length - offset);
    return fold(pseudo);
}

/* `packet` with its TCP checksum field set to `field(p, length, offset)` where it
 * is a TCP packet of the partial form's rule (tso.tcp_offset); else itself. */
static PyObject *with_tcp_checksum(PyObject *packet,
                                   unsigned int (*field)(const unsigned char *, Py_ssize_t,
                                                         Py_ssize_t)) {
    Py_buffer view;
    if (PyObject_GetBuffer(packet, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t offset = tcp_offset(p, view.len);
    PyObject *out;
    if (!offset) {
        out = packet;
        Py_INCREF(out);
    } else {
        out = with_field(p, view.len, offset + 16, field(p, view.len, offset));
    }
    PyBuffer_Release(&view);
    return out;
}

/* The complete checksum of a TCP packet of the partial form (TCP at `offset`). */
static unsigned int complete_field(const unsigned char *p, Py_ssize_t length, Py_ssize_t offset) {
    return 0xFFFF - ones_sum(p + offset, length - offset);
}

PyDoc_STRVAR(complete_doc,
             "complete(packet) -> bytes\n\n"
             "tso.python_complete (the reference): a TCP packet of the partial form\n"
             "with its checksum completed; any other packet as it is.");

static PyObject *complete(PyObject *module, PyObject *packet) {
    return with_tcp_checksum(packet, complete_field);
}

PyDoc_STRVAR(to_partial_doc,
             "to_partial(packet) -> bytes\n\n"
             "tso.python_to_partial (the reference): a complete TCP packet in the\n"
             "partial form; any other packet as it is.");

static PyObject *to_partial(PyObject *module, PyObject *packet) {
    return with_tcp_checksum(packet, partial_field);
}

#define GSO_NONE 0
#define GSO_ECN 0x80

static PyObject *one(PyObject *packet) {
    if (packet == NULL)
        return NULL;
    return Py_BuildValue("[N]", packet);
}

PyDoc_STRVAR(packets_doc,
             "packets(data) -> list[bytes]\n\n"
             "tso.python_packets (the reference): one read of a TUN with IFF_VNET_HDR\n"
             "and TSO as packets in the partial TCP form; [b\"\"] for a read that\n"
             "cannot be taken apart.");

static PyObject *packets(PyObject *module, PyObject *data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *d = view.buf;
    PyObject *out;
    if (view.len <= VNET_HDR_LEN) {
        out = one(PyBytes_FromStringAndSize(NULL, 0));
        goto done;
    }
    uint16_t fields[3]; /* gso_size, csum_start, csum_offset: the host's byte order */
    memcpy(fields, d + 4, sizeof fields);
    int flags = d[0], gso_type = d[1] & ~GSO_ECN;
    const unsigned char *p = d + VNET_HDR_LEN;
    Py_ssize_t length = view.len - VNET_HDR_LEN;
    if (gso_type == GSO_TCPV4) {
        out = segments_of(p, length, fields[0]);
        if (out != NULL && PyList_GET_SIZE(out) == 0) {
            Py_DECREF(out);
            out = one(PyBytes_FromStringAndSize(NULL, 0));
        }
        goto done;
    }
    if (gso_type != GSO_NONE) {
        out = one(PyBytes_FromStringAndSize(NULL, 0));
        goto done;
    }
    Py_ssize_t offset = tcp_offset(p, length);
    if (flags & F_NEEDS_CSUM) {
        Py_ssize_t start = fields[1], end = (Py_ssize_t)fields[1] + fields[2];
        if (offset || end + 2 > length) /* TCP: partial already, the form */
            out = one(PyBytes_FromStringAndSize((const char *)p, length));
        else { /* another partial packet (UDP from the gateway host): completed here */
            unsigned int checksum = 0xFFFF - ones_sum(p + start, length - start);
            out = one(with_field(p, length, end, checksum ? checksum : 0xFFFF));
        }
    } else if (offset) {
        out = one(with_field(p, length, offset + 16, partial_field(p, length, offset)));
    } else {
        out = one(PyBytes_FromStringAndSize((const char *)p, length));
    }
done:
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef offload_methods[] = {
    {"coalesce", (PyCFunction)(void (*)(void))coalesce, METH_FASTCALL, coalesce_doc},
    {"segments", (PyCFunction)(void (*)(void))segments, METH_FASTCALL, segments_doc},
    {"packets", packets, METH_O, packets_doc},
    {"complete", complete, METH_O, complete_doc},
    {"to_partial", to_partial, METH_O, to_partial_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef offload_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pushgate_io._offload",
    .m_doc = "The compiled TUN offloads (pushgate_io/gro.py and tso.py have the reference).",
    .m_size = -1,
    .m_methods = offload_methods,
};

PyMODINIT_FUNC PyInit__offload(void) { return PyModule_Create(&offload_module); }
