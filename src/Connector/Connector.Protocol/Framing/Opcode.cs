namespace Connector.Protocol.Framing;

/// <summary>What a frame asks for. Append-only: a value is never reused or renumbered.</summary>
public enum Opcode : ushort
{
    /// <summary>Handshake: protocol version, engine kind, instance id, capabilities.</summary>
    Hello = 1,

    /// <summary>Liveness check; the reply echoes the body.</summary>
    Ping = 2,

    /// <summary>A worker registers its KV memory and layouts.</summary>
    Register = 3,

    /// <summary>How many leading tokens of a prompt are cached; leases them.</summary>
    Lookup = 4,

    /// <summary>Copy chunks out of engine blocks into the cache.</summary>
    Store = 5,

    /// <summary>Copy chunks from the cache into engine blocks.</summary>
    Load = 6,

    /// <summary>End a lease.</summary>
    Release = 7,

    /// <summary>Drop every chunk that is not leased or being copied.</summary>
    Clear = 8,

    /// <summary>Counters of the sidecar.</summary>
    Stats = 9,
}

/// <summary>Bits of the frame header's flags field.</summary>
[Flags]
public enum FrameFlags : ushort
{
    /// <summary>A request.</summary>
    None = 0,

    /// <summary>The frame answers the request with the same id.</summary>
    Reply = 1,

    /// <summary>The reply's body is an <see cref="Messages.ErrorBody"/>.</summary>
    Error = 2,
}

/// <summary>Why a request was refused. Append-only (docs/protocol.md section 2).</summary>
public enum ErrorCode
{
    /// <summary>The frame header is malformed.</summary>
    BadFrame = 1,

    /// <summary>Frame version or HELLO protocol version not supported.</summary>
    UnsupportedVersion = 2,

    /// <summary>Opcode not known to this server.</summary>
    UnknownOpcode = 3,

    /// <summary>Body does not decode or a field is invalid.</summary>
    BadRequest = 4,

    /// <summary>Body length above the server's maximum.</summary>
    FrameTooLarge = 5,

    /// <summary>HELLO not done, or the request needs a REGISTER first.</summary>
    NotReady = 6,

    /// <summary>A block id, offset or extent outside the registered memory.</summary>
    OutOfRange = 7,

    /// <summary>A layout descriptor that is inconsistent or overflows its region.</summary>
    BadLayout = 8,

    /// <summary>The kernel refused access to the engine's memory.</summary>
    MemoryAccessDenied = 9,

    /// <summary>Engine memory could not be read or written.</summary>
    MemoryFault = 10,

    /// <summary>The host tier could not make room.</summary>
    NoSpace = 11,

    /// <summary>RELEASE of a lease that does not exist.</summary>
    UnknownLease = 12,

    /// <summary>The sidecar is stopping.</summary>
    ShuttingDown = 13,

    /// <summary>A bug in the sidecar.</summary>
    Internal = 14,

    /// <summary>A valid request for something this build does not do.</summary>
    Unsupported = 15,

    /// <summary>The connecting process may not do this: foreign memory, another owner's instance or lease, or an administrative request from a non-administrator.</summary>
    PermissionDenied = 16,

    /// <summary>A configured bound was hit (tokens, chunk geometry, salt or id length, leases per connection); the message names the setting.</summary>
    LimitExceeded = 17,
}
