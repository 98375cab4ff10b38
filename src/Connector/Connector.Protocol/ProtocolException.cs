using Connector.Protocol.Framing;

namespace Connector.Protocol;

/// <summary>A request that breaks the protocol, with the error code its reply carries.</summary>
public sealed class ProtocolException : Exception
{
    /// <summary>Creates the exception.</summary>
    public ProtocolException(ErrorCode code, string message)
        : base(message) => Code = code;

    /// <summary>Creates the exception with its cause.</summary>
    public ProtocolException(ErrorCode code, string message, Exception inner)
        : base(message, inner) => Code = code;

    /// <summary>The machine-readable reason.</summary>
    public ErrorCode Code { get; }
}
