"""The zeromesh exception tree.

Every error zeromesh raises on purpose derives from :class:`MeshError`. Errors are named by
what happened, carry their facts as attributes, and also inherit the built-in they resemble
(``ValueError``, ``TimeoutError``, ``OSError``...) so callers may catch either::

    MeshError
    ├── ConfigError (ValueError)              bad configuration or argument
    │   └── DataDirInUse                      another live Node holds this data dir
    │   └── DLQEntryNotFound (KeyError)       no dead letter at that offset (pipeline)
    ├── ClosedError                           you closed it (node, log, pattern object)
    ├── CodecError (ValueError)               bytes that are not a valid envelope
    │   ├── MalformedEvent                    missing / mistyped field, undecodable bytes
    │   ├── UnsupportedVersion                a major version this build does not speak
    │   └── EventTooLarge                     encoded size over the configured maximum
    ├── ProtocolError (ValueError)            a malformed or unexpected wire frame
    │   └── TxtRecordError                    a bad mDNS TXT record (mesh.txt)
    │       └── TxtRecordTooLarge             required keys over the size limit
    ├── LogError                              the durable log
    │   ├── LogCorrupted                      a bad record, with its location
    │   │   └── LogCorruptedRange             unreadable records mid-log; resume at next_offset
    │   ├── LogLocked                         another process is the stream's writer
    │   ├── OffsetOutOfRange (IndexError)     asked for an offset the log does not hold
    │   ├── LogFull (OSError)                 the disk or the file size limit is full
    │   └── RecordTooLarge (ValueError)       a payload over the log's maximum
    ├── StateError                            the crash-safe state store
    ├── PeerError                             peer table / control channel
    │   └── PeerUnreachable                   no live route to that peer
    ├── SecurityError                         keys, certificates, authentication, permissions
    │   ├── KeyFileError (OSError)            missing, malformed or too-open key file
    │   ├── CertificateError (ValueError)     tampered, expired, revoked or malformed certificate
    │   ├── AuthenticationFailed              a peer's key is not the one it announced / allowed
    │   ├── PermissionDenied (PermissionError) an action the rules do not allow
    │   ├── SignatureInvalid                  an event's Ed25519 signature refused
    │   └── DecryptionFailed                  at-rest data that the key does not open
    ├── WrongThread (RuntimeError)            a one-thread object used from another thread
    └── MeshTimeout (TimeoutError)            a deadline passed
        └── ReplicationTimeout                fewer stores than asked hold an event (pub/sub)

Modules add their own subclasses below the matching branch (each section is owned by one
module; keep them grouped).
"""

from __future__ import annotations


class MeshError(Exception):
    """Base class of every error zeromesh raises on purpose."""


class ConfigError(MeshError, ValueError):
    """A configuration value or argument is invalid."""


class DataDirInUse(ConfigError):
    """Another live ``Node`` (in this or another process) holds this data directory.

    One node per data dir: two would share one node id (peers could not tell them apart, and
    their ipc sockets and logs would collide).

    Attributes:
        path: the data directory.
        holder: the holder's pid as it wrote it in ``node.lock``, or None.
    """

    def __init__(self, path: str, holder: str | None) -> None:
        super().__init__(f"data dir {path} is in use by "
                         + (f"process {holder}" if holder else "another process")
                         + " (node.lock): one Node per data dir; stop it or use another "
                         "--data-dir")
        self.path = path
        self.holder = holder


class ClosedError(MeshError):
    """The object was closed by its owner and can no longer be used."""


class SendFailed(ClosedError):
    """Events were logged, but sending them live failed (the data socket is gone).

    Durable events are in the log and keep their seqs: subscribers get them by replay once a
    publisher serves the stream again. Nothing of a best-effort (``durable=False``) stream
    that failed was kept.

    Attributes:
        seqs: the seqs assigned to the events of the failed call.
        durable: True when they are in the log (and will be replayed).
    """

    def __init__(self, seqs: range, durable: bool, reason: str) -> None:
        what = (f"events {seqs.start}..{seqs.stop - 1}" if len(seqs) != 1
                else f"event {seqs.start}")
        tail = ("are in the log (durable) and will be replayed to subscribers"
                if durable else "were not kept (best-effort stream)")
        super().__init__(f"{what} {tail}; sending them live failed: {reason}")
        self.seqs = seqs
        self.durable = durable


# --- envelope / codec (mesh.envelope) -------------------------------------------------------


class CodecError(MeshError, ValueError):
    """Bytes or a mapping that are not a valid zeromesh envelope."""


class MalformedEvent(CodecError):
    """A field is missing, has the wrong type, or the bytes are not decodable.

    Attributes:
        field: the offending field name, when one is known.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnsupportedVersion(CodecError):
    """The envelope (or frame) declares a major version this build does not speak.

    Attributes:
        version: the version found.
        supported: the major versions this build accepts.
    """

    def __init__(self, version: object, supported: tuple[int, ...]) -> None:
        super().__init__(f"unsupported version {version!r}; this build speaks {supported}")
        self.version = version
        self.supported = supported


class EventTooLarge(CodecError):
    """The encoded event is larger than the configured maximum.

    Attributes:
        size: the encoded size in bytes.
        max_size: the limit in bytes.
    """

    def __init__(self, size: int, max_size: int) -> None:
        super().__init__(f"event of {size} bytes exceeds the maximum of {max_size} bytes")
        self.size = size
        self.max_size = max_size


# --- wire frames (mesh.control and patterns) -------------------------------------------------


class ProtocolError(MeshError, ValueError):
    """A wire frame that is malformed, of an unknown kind, or unexpected here."""


class UnsupportedProtocol(ProtocolError):
    """A control frame or peer declares a protocol major version this build does not speak.

    Attributes:
        version: the version found.
        supported: the major versions this build accepts.
    """

    def __init__(self, version: object, supported: tuple[int, ...]) -> None:
        super().__init__(f"unsupported protocol version {version!r}; this build speaks {supported}")
        self.version = version
        self.supported = supported


class FrameTooLarge(ProtocolError):
    """An encoded control message body is larger than the configured maximum.

    Attributes:
        size: the encoded size in bytes.
        max_size: the limit in bytes.
    """

    def __init__(self, size: int, max_size: int) -> None:
        super().__init__(f"control body of {size} bytes exceeds the maximum of {max_size} bytes")
        self.size = size
        self.max_size = max_size


# --- durable log (mesh.log) ------------------------------------------------------------------


class LogError(MeshError):
    """An error of the durable log."""


class QueueStateMissing(LogError):
    """A work queue's task log or journal is missing while the other one has records (a
    deleted directory): opening it would silently lose every pending task or re-run every
    acked one. Restore the directory, or open the queue with ``accept_loss=True``."""


class LogCorrupted(LogError):
    """A record failed its checksum or framing check.

    Attributes:
        path: the segment file.
        position: byte position of the bad record in that file.
        reason: what check failed.
    """

    def __init__(self, path: str, position: int, reason: str) -> None:
        super().__init__(f"corrupted log record in {path} at byte {position}: {reason}")
        self.path = path
        self.position = position
        self.reason = reason


class LogLocked(LogError):
    """Another process holds the writer lock of this stream.

    Attributes:
        path: the lock file.
        holder: what is known of the holder (a pid), or None.
    """

    def __init__(self, path: str, holder: str | None = None) -> None:
        who = f" (held by {holder})" if holder else ""
        super().__init__(f"log {path} is locked for writing by another process{who}")
        self.path = path
        self.holder = holder


class OffsetOutOfRange(LogError, IndexError):
    """The requested offset is not in the log (deleted by retention, or not written yet).

    Attributes:
        offset: the offset asked for.
        first: the first offset the log holds (None when empty).
        last: the last offset the log holds (None when empty).
    """

    def __init__(self, offset: int, first: int | None, last: int | None) -> None:
        super().__init__(f"offset {offset} is out of range [{first}, {last}]")
        self.offset = offset
        self.first = first
        self.last = last


class LogFull(LogError, OSError):
    """The disk (or the process file size limit) is full; nothing partial was kept."""


class LogCorruptedRange(LogCorrupted):
    """Records in the middle of a log cannot be read (bad checksum, or a segment is missing).

    Good records after the damage stay readable: resume from ``next_offset``.

    Attributes:
        offset: the first offset that cannot be read (None when unknown).
        next_offset: the first readable offset after the damage (None when unknown).
    """

    def __init__(self, path: str, position: int, reason: str, *, offset: int | None,
                 next_offset: int | None) -> None:
        super().__init__(path, position, reason)
        self.offset = offset
        self.next_offset = next_offset


class RecordTooLarge(LogError, ValueError):
    """A payload (or batch) is larger than the log accepts.

    Attributes:
        size: the size in bytes.
        max_size: the limit in bytes.
    """

    def __init__(self, size: int, max_size: int) -> None:
        super().__init__(f"record of {size} bytes exceeds the log maximum of {max_size} bytes")
        self.size = size
        self.max_size = max_size


# --- state store (mesh.state) ----------------------------------------------------------------


class StateError(MeshError):
    """The crash-safe state store failed."""


# --- peers and control channel (mesh.node, mesh.peers, mesh.control) -------------------------


class PeerError(MeshError):
    """An error about a peer or the control channel."""


class PeerUnreachable(PeerError):
    """No live route to the given peer."""


class TxtRecordError(ProtocolError):
    """An mDNS TXT record that is not a valid zeromesh announcement (mesh.txt).

    Attributes:
        field: the offending TXT key (e.g. ``"v"``, ``"ep.control"``), or None for the record.
        reason: what is wrong with it.
    """

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        where = f" (key {field!r})" if field is not None else ""
        super().__init__(f"invalid zeromesh TXT record{where}: {reason}")
        self.field = field
        self.reason = reason


class TxtRecordTooLarge(TxtRecordError):
    """The required part of a TXT record does not fit the size limit.

    Attributes:
        size: the encoded size of the required keys in bytes.
        max_size: the limit in bytes.
    """

    def __init__(self, size: int, max_size: int, *, field: str | None = None) -> None:
        super().__init__(f"{size} bytes exceed the limit of {max_size} bytes", field=field)
        self.size = size
        self.max_size = max_size


# --- pipeline (patterns.pipeline) -----------------------------------------------------------


class WrongThread(MeshError, RuntimeError):
    """An object whose sockets belong to one thread was used from another thread."""


class DLQEntryNotFound(ConfigError, KeyError):
    """No dead letter at that offset of the queue's DLQ.

    Attributes:
        queue: the queue.
        offset: the DLQ offset asked for.
    """

    def __init__(self, queue: str, offset: int) -> None:
        super().__init__(f"no dead letter at offset {offset} of queue {queue!r}")
        self.queue = queue
        self.offset = offset


# --- security (mesh.security) --------------------------------------------------------------


class SecurityError(MeshError):
    """An error of the security layer (keys, certificates, authentication, permissions)."""


class KeyFileError(SecurityError, OSError):
    """A key file is missing, malformed, or readable by others than its owner.

    Attributes:
        path: the file.
        reason: what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"key file {path}: {reason}")
        self.path = path
        self.reason = reason


class CertificateError(SecurityError, ValueError):
    """A certificate (or revocation list) that is tampered, expired, revoked or malformed.

    Attributes:
        reason: ``"signature"``, ``"expired"``, ``"revoked"``, ``"malformed"`` or ``"authority"``.
        node_id: the certificate's node id when it could be read, else None.
    """

    def __init__(self, message: str, *, reason: str, node_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.node_id = node_id


class AuthenticationFailed(SecurityError):
    """A peer's key is unknown, not allowed, or not the key it announced.

    Attributes:
        peer: the peer's node id or endpoint, when known.
    """

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer


class PermissionDenied(SecurityError, PermissionError):
    """The permission rules do not allow this action.

    Attributes:
        principal: who asked (node id or key).
        action: the action (``publish``, ``subscribe``, ``replay``, ``push``, ``work``,
            ``call``, ``serve``).
        resource: the topic, queue or service name.
    """

    def __init__(self, principal: str, action: str, resource: str) -> None:
        super().__init__(f"{principal} may not {action} {resource!r}")
        self.principal = principal
        self.action = action
        self.resource = resource


class SignatureInvalid(SecurityError):
    """An event's end-to-end signature is missing, from an unknown key, or does not verify.

    Attributes:
        event_id: the event's id.
        reason: ``"unsigned"``, ``"unknown_key"`` or ``"bad_signature"``.
    """

    def __init__(self, event_id: str, reason: str) -> None:
        super().__init__(f"event {event_id}: signature refused ({reason})")
        self.event_id = event_id
        self.reason = reason


class DecryptionFailed(SecurityError):
    """Encrypted data at rest could not be opened: wrong key, or the bytes were altered.

    Attributes:
        where: what was being decrypted (a path and position, or a description).
    """

    def __init__(self, where: str) -> None:
        super().__init__(f"cannot decrypt {where}: wrong key or altered data")
        self.where = where


# --- time ------------------------------------------------------------------------------------


class MeshTimeout(MeshError, TimeoutError):
    """A deadline passed before the operation completed."""


class ReplicationTimeout(MeshTimeout):
    """Fewer stores than asked hold an event when the wait ended (``Publisher(replicas=k)``).

    The event is in the publisher's own log (durable per its fsync policy) and stays
    published; only the replication promise was not met in time.

    Attributes:
        seq: the seq that was waited for.
        want: the number of stores asked for.
        have: the number of stores that held it when the wait ended.
    """

    def __init__(self, stream: str, seq: int, want: int, have: int) -> None:
        super().__init__(f"event {seq} of stream {stream!r} is held by {have} of {want} "
                         "store(s) asked for; it is in the local log")
        self.stream = stream
        self.seq = seq
        self.want = want
        self.have = have
