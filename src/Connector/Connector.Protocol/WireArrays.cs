using System.Runtime.InteropServices;
using Connector.Protocol.Framing;

namespace Connector.Protocol;

/// <summary>Views and builds the binary arrays of the wire: u32le token ids and i32le block ids.</summary>
public static class WireArrays
{
    static WireArrays()
    {
        if (!BitConverter.IsLittleEndian)
        {
            throw new PlatformNotSupportedException("kvsidecar's wire arrays are little-endian and read in place; big-endian hosts are not supported.");
        }
    }

    /// <summary>Views a token array without copying.</summary>
    /// <exception cref="ProtocolException">The length is not a multiple of 4.</exception>
    public static ReadOnlySpan<uint> AsTokens(byte[]? bytes) => MemoryMarshal.Cast<byte, uint>(Checked(bytes, "tokens"));

    /// <summary>Views a block-id array without copying.</summary>
    /// <exception cref="ProtocolException">The length is not a multiple of 4.</exception>
    public static ReadOnlySpan<int> AsBlockIds(byte[]? bytes) => MemoryMarshal.Cast<byte, int>(Checked(bytes, "block_ids"));

    /// <summary>Encodes token ids.</summary>
    public static byte[] FromTokens(ReadOnlySpan<uint> tokens) => MemoryMarshal.AsBytes(tokens).ToArray();

    /// <summary>Encodes block ids.</summary>
    public static byte[] FromBlockIds(ReadOnlySpan<int> blockIds) => MemoryMarshal.AsBytes(blockIds).ToArray();

    private static ReadOnlySpan<byte> Checked(byte[]? bytes, string field)
    {
        if (bytes is null)
        {
            return default;
        }

        if ((bytes.Length & 3) != 0)
        {
            throw new ProtocolException(ErrorCode.BadRequest, $"{field} is {bytes.Length} bytes, not a whole number of 4-byte values.");
        }

        return bytes;
    }
}
