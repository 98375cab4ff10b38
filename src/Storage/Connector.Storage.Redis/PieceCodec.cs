using K4os.Compression.LZ4;

namespace Connector.Storage.Redis;

/// <summary>
/// Encodes one piece of a chunk for the wire and decodes it back. Each piece is an independent LZ4 block, so a
/// reader decodes piece i while piece i+1 is still arriving. A piece that does not shrink by at least 1/32 is stored
/// raw (a stored piece as long as its raw bytes is raw by definition: LZ4 output is only kept when shorter), which
/// spares readers the decoder on incompressible KV data.
/// </summary>
internal static class PieceCodec
{
    /// <summary>The most bytes an encoded piece of <paramref name="rawLength"/> bytes may take to be kept encoded.</summary>
    public static int EncodeLimit(int rawLength) => rawLength - Math.Max(1, rawLength / 32);

    /// <summary>Encodes <paramref name="raw"/> into <paramref name="destination"/> (at least <see cref="EncodeLimit"/> bytes).</summary>
    /// <returns>The encoded length, or 0 when the piece should be stored raw.</returns>
    public static int TryEncode(RedisCompression codec, ReadOnlySpan<byte> raw, Span<byte> destination)
    {
        if (codec != RedisCompression.Lz4 || raw.Length < 64)
        {
            return 0;
        }

        int encoded = LZ4Codec.Encode(raw, destination[..EncodeLimit(raw.Length)], LZ4Level.L00_FAST);
        return encoded > 0 && encoded < raw.Length ? encoded : 0;
    }

    /// <summary>Decodes a stored piece into exactly <paramref name="destination"/>; false when it is not a valid piece of that size.</summary>
    public static bool TryDecode(RedisCompression codec, ReadOnlySpan<byte> stored, Span<byte> destination)
    {
        if (stored.Length == destination.Length)
        {
            stored.CopyTo(destination);
            return true;
        }

        if (codec != RedisCompression.Lz4 || stored.Length > destination.Length || stored.Length == 0)
        {
            return false;
        }

        return LZ4Codec.Decode(stored, destination) == destination.Length;
    }
}
