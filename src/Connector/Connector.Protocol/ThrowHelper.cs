using System.Diagnostics.CodeAnalysis;
using System.Runtime.CompilerServices;
using Connector.Protocol.Framing;

namespace Connector.Protocol;

/// <summary>Throws out of line so that callers on hot paths stay small and inlinable.</summary>
internal static class ThrowHelper
{
    [DoesNotReturn]
    public static void ThrowDestinationTooSmall() => throw CreateArgument("destination is smaller than a frame header");

    [DoesNotReturn]
    public static void ThrowBadRequest(string message) => throw CreateProtocol(ErrorCode.BadRequest, message);

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static ArgumentException CreateArgument(string message) => new(message);

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static ProtocolException CreateProtocol(ErrorCode code, string message) => new(code, message);
}
