"""NBD wire constants and struct layouts, shared by the client and the server.

Source: doc/proto.md of NetworkBlockDevice/nbd and qemu's docs/interop/nbd.rst.
Everything on the wire is big-endian. The tables below are the one description of the
bytes; the parsers' docstrings repeat the layout of what each one reads.

Handshake (fixed newstyle; client_handshake.py and server_handshake.py)::

    greeting, server -> client (HANDSHAKE), 18 bytes
      0  u64  NBDMAGIC  "NBDMAGIC"
      8  u64  IHAVEOPT  "IHAVEOPT" (CLISERV_MAGIC here is the oldstyle protocol: refused)
     16  u16  handshake flags: FIXED_NEWSTYLE, NO_ZEROES
    client flags, client -> server (CLIENT_FLAGS), 4 bytes
      0  u32  C_FIXED_NEWSTYLE, C_NO_ZEROES; any other bit ends the connection
    option request, client -> server (OPTION_REQUEST), 16 + n bytes
      0  u64  IHAVEOPT
      8  u32  option (NBD_OPT_*)
     12  u32  n
     16  n    option data
    option reply, server -> client (OPTION_REPLY), 20 + n bytes; several may answer one option
      0  u64  OPTION_REPLY_MAGIC 0x0003e889045565a9
      8  u32  the option it answers
     12  u32  reply type (NBD_REP_*; bit 31 set: an error, its data a UTF-8 message)
     16  u32  n
     20  n    reply data
    EXPORT_NAME reply (no option-reply header; a refusal just closes), 10 or 134 bytes
      0  u64  export size
      8  u16  transmission flags
     10  124  zero bytes, unless NO_ZEROES was agreed

    option data                         layout
    EXPORT_NAME                         the export name, to the end (no length)
    INFO, GO                            u32 n | n bytes name | u16 k | k x u16 NBD_INFO_* asked
    LIST_/SET_META_CONTEXT              u32 n | n bytes name | u32 k | k x (u32 m | m bytes query)
    STARTTLS, STRUCTURED_REPLY, LIST,   nothing
    ABORT

    reply data                          layout
    REP_ACK                             nothing
    REP_SERVER (LIST)                   u32 n | n bytes name | description, to the end
    REP_META_CONTEXT                    u32 context id (0 for LIST) | context name, to the end
    REP_INFO, INFO_EXPORT               u16 0 | u64 size | u16 transmission flags (12 bytes)
    REP_INFO, INFO_NAME / _DESCRIPTION  u16 1 / 2 | UTF-8 text, to the end
    REP_INFO, INFO_BLOCK_SIZE           u16 3 | u32 minimum | u32 preferred | u32 maximum (14)

Transmission (client.py and replies.py; server_conn.py)::

    request, client -> server (REQUEST), 28 bytes, then n bytes of data for a WRITE
      0  u32  REQUEST_MAGIC 0x25609513
      4  u16  command flags (NBD_CMD_FLAG_*)
      6  u16  command (NBD_CMD_*)
      8  u64  cookie, echoed by every reply to this request
     16  u64  offset
     24  u32  length (n)
    simple reply (SIMPLE_REPLY), 16 bytes, then the data of a READ that succeeded
      0  u32  SIMPLE_REPLY_MAGIC 0x67446698
      4  u32  error (an NBD errno, below; 0 = success)
      8  u64  cookie
    structured reply chunk (STRUCTURED_REPLY), 20 + n bytes
      0  u32  STRUCTURED_REPLY_MAGIC 0x668e33ef
      4  u16  flags: REPLY_FLAG_DONE on the last chunk of a reply
      6  u16  chunk type (NBD_REPLY_TYPE_*)
      8  u64  cookie
     16  u32  n
     20  n    chunk payload

    chunk payload                       layout
    NONE                                nothing (only with DONE)
    OFFSET_DATA                         u64 offset | n - 8 bytes of data
    OFFSET_HOLE                         u64 offset | u32 length (reads as zeroes) (OFFSET_HOLE_STRUCT)
    BLOCK_STATUS                        u32 context id | per extent: u32 length, u32 flags (EXTENT)
    ERROR                               u32 errno | u16 m | m bytes message (ERROR_STRUCT)
    ERROR_OFFSET                        as ERROR, then u64 offset where it failed
"""

from __future__ import annotations

import struct

# --- magics -----------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT" (newstyle)
CLISERV_MAGIC = 0x00420281861253       # oldstyle negotiation (not supported)
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71    # extended headers: recognised, not negotiated
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# --- handshake flags (server -> client, u16) ---------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# --- client flags (client -> server, u32) ------------------------------------
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# --- transmission flags (u16) ------------------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11
FLAG_BLOCK_STAT_PAYLOAD = 1 << 12

TRANSMISSION_FLAG_NAMES = {
    FLAG_HAS_FLAGS: "has_flags",
    FLAG_READ_ONLY: "read_only",
    FLAG_SEND_FLUSH: "flush",
    FLAG_SEND_FUA: "fua",
    FLAG_ROTATIONAL: "rotational",
    FLAG_SEND_TRIM: "trim",
    FLAG_SEND_WRITE_ZEROES: "write_zeroes",
    FLAG_SEND_DF: "df",
    FLAG_CAN_MULTI_CONN: "multi_conn",
    FLAG_SEND_RESIZE: "resize",
    FLAG_SEND_CACHE: "cache",
    FLAG_SEND_FAST_ZERO: "fast_zero",
    FLAG_BLOCK_STAT_PAYLOAD: "block_status_payload",
}

# --- options -----------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

OPTION_NAMES = {
    OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    OPT_ABORT: "NBD_OPT_ABORT",
    OPT_LIST: "NBD_OPT_LIST",
    OPT_PEEK_EXPORT: "NBD_OPT_PEEK_EXPORT",
    OPT_STARTTLS: "NBD_OPT_STARTTLS",
    OPT_INFO: "NBD_OPT_INFO",
    OPT_GO: "NBD_OPT_GO",
    OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "NBD_OPT_EXTENDED_HEADERS",
}

# --- option reply types ------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9
REP_ERR_EXT_HEADER_REQD = REP_FLAG_ERROR | 10

REPLY_TYPE_NAMES = {
    REP_ACK: "NBD_REP_ACK",
    REP_SERVER: "NBD_REP_SERVER",
    REP_INFO: "NBD_REP_INFO",
    REP_META_CONTEXT: "NBD_REP_META_CONTEXT",
    REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP",
    REP_ERR_POLICY: "NBD_REP_ERR_POLICY",
    REP_ERR_INVALID: "NBD_REP_ERR_INVALID",
    REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM",
    REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN",
    REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG",
    REP_ERR_EXT_HEADER_REQD: "NBD_REP_ERR_EXT_HEADER_REQD",
}

# --- NBD_INFO_* (inside NBD_REP_INFO, and requested by INFO/GO) -------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- commands ----------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

COMMAND_NAMES = {
    CMD_READ: "NBD_CMD_READ",
    CMD_WRITE: "NBD_CMD_WRITE",
    CMD_DISC: "NBD_CMD_DISC",
    CMD_FLUSH: "NBD_CMD_FLUSH",
    CMD_TRIM: "NBD_CMD_TRIM",
    CMD_CACHE: "NBD_CMD_CACHE",
    CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES",
    CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS",
    CMD_RESIZE: "NBD_CMD_RESIZE",
}

# --- command flags (u16) -----------------------------------------------------
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

# --- structured replies ------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2

# --- errno values on the wire (fixed by the spec, not the host's errno) -----
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

ERRNO_NAMES = {
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}

# --- meta contexts -----------------------------------------------------------
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"

STATE_HOLE = 1      # base:allocation
STATE_ZERO = 2      # base:allocation
STATE_DIRTY = 1     # qemu:dirty-bitmap:*

# --- defaults and limits -----------------------------------------------------
DEFAULT_PORT = 10809
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_BLOCK = 32 * 1024 * 1024   # when no NBD_INFO_BLOCK_SIZE was negotiated
MAX_OPTION_LENGTH = 64 * 1024          # cap on option payloads we accept or send
MAX_NAME_LENGTH = 4096                 # spec: export names up to 4096 bytes

# --- struct layouts ----------------------------------------------------------
HANDSHAKE = struct.Struct(">QQH")          # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_REQUEST = struct.Struct(">QII")     # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")      # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")   # size, transmission flags (+124 zeroes unless NO_ZEROES)
REQUEST = struct.Struct(">IHHQQI")         # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")       # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI") # magic, flags, type, cookie, length
INFO_EXPORT_STRUCT = struct.Struct(">HQH") # NBD_INFO_EXPORT, size, flags
INFO_BLOCK_SIZE_STRUCT = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
OFFSET_HOLE_STRUCT = struct.Struct(">QI")  # offset, length
ERROR_STRUCT = struct.Struct(">IH")        # errno, message length
EXTENT = struct.Struct(">II")              # length, flags (32-bit block status)
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
U16 = struct.Struct(">H")


def errno_name(code: int) -> str:
    return ERRNO_NAMES.get(code, f"errno {code}")


def option_name(opt: int) -> str:
    return OPTION_NAMES.get(opt, f"option {opt}")


def reply_type_name(rep: int) -> str:
    return REPLY_TYPE_NAMES.get(rep, f"reply type {rep:#x}")


def command_name(cmd: int) -> str:
    return COMMAND_NAMES.get(cmd, f"command {cmd}")


def flag_names(flags: int) -> list[str]:
    """Names of the transmission flags set in *flags*."""
    return [name for bit, name in TRANSMISSION_FLAG_NAMES.items() if flags & bit]
