using System.Buffers.Binary;
using System.Text;

namespace Connector.Core.Keys;

/// <summary>
/// Everything that makes KV bytes incompatible: two engines share cache exactly when their namespaces
/// are equal (ARCHITECTURE section 2; the byte encoding is in docs/hashing.md).
/// </summary>
/// <param name="ModelId">The model id.</param>
/// <param name="KvDtype">The KV cache dtype.</param>
/// <param name="LayoutFingerprint">The page geometry fingerprint computed from the layouts.</param>
/// <param name="BlockTokens">Tokens per engine block.</param>
/// <param name="ChunkTokens">Tokens per chunk, a positive multiple of <paramref name="BlockTokens"/>.</param>
/// <param name="TpSize">Tensor-parallel size.</param>
/// <param name="TpRank">Tensor-parallel rank, or -1 for replicated KV (MLA).</param>
/// <param name="KvGroup">The KV cache group.</param>
/// <param name="FormatVersion">Version of the chunk byte format.</param>
/// <param name="CacheSalt">The tenant salt; "" for none.</param>
public sealed record KvNamespace(
    string ModelId,
    string KvDtype,
    string LayoutFingerprint,
    int BlockTokens,
    int ChunkTokens,
    int TpSize,
    int TpRank,
    int KvGroup,
    int FormatVersion,
    string CacheSalt)
{
    /// <summary>The tag that starts every encoding; a new encoding gets a new tag.</summary>
    public const string EncodingTag = "kvsidecar/namespace/v1";

    /// <summary>The same namespace under another tenant salt (null means none).</summary>
    public KvNamespace WithSalt(string? cacheSalt) => this with { CacheSalt = cacheSalt ?? string.Empty };

    /// <summary>Checks every field.</summary>
    /// <exception cref="ArgumentException">A field is invalid; the message says which and why.</exception>
    public void Validate()
    {
        if (string.IsNullOrEmpty(ModelId))
        {
            throw new ArgumentException("the namespace needs a model id");
        }

        if (string.IsNullOrEmpty(KvDtype))
        {
            throw new ArgumentException("the namespace needs a KV dtype");
        }

        if (LayoutFingerprint is null || CacheSalt is null)
        {
            throw new ArgumentException("the layout fingerprint and the cache salt must not be null");
        }

        if (BlockTokens <= 0 || ChunkTokens <= 0 || ChunkTokens % BlockTokens != 0)
        {
            throw new ArgumentException($"chunk_tokens ({ChunkTokens}) must be a positive multiple of block_tokens ({BlockTokens})");
        }

        if (TpSize <= 0 || TpRank < -1 || TpRank >= TpSize)
        {
            throw new ArgumentException($"tp_rank {TpRank} is outside [-1, tp_size {TpSize})");
        }

        if (KvGroup < 0 || FormatVersion <= 0)
        {
            throw new ArgumentException($"kv_group ({KvGroup}) must be >= 0 and format_version ({FormatVersion}) > 0");
        }
    }

    /// <summary>The canonical encoding: the tag, then each field in declaration order, strings as u32le byte length + UTF-8, integers as i32le.</summary>
    public byte[] Encode()
    {
        var buffer = new List<byte>(128);
        AppendString(buffer, EncodingTag);
        AppendString(buffer, ModelId);
        AppendString(buffer, KvDtype);
        AppendString(buffer, LayoutFingerprint);
        AppendInt(buffer, BlockTokens);
        AppendInt(buffer, ChunkTokens);
        AppendInt(buffer, TpSize);
        AppendInt(buffer, TpRank);
        AppendInt(buffer, KvGroup);
        AppendInt(buffer, FormatVersion);
        AppendString(buffer, CacheSalt ?? string.Empty);
        return [.. buffer];
    }

    private static void AppendString(List<byte> buffer, string value)
    {
        byte[] utf8 = Encoding.UTF8.GetBytes(value);
        AppendInt(buffer, utf8.Length);
        buffer.AddRange(utf8);
    }

    private static void AppendInt(List<byte> buffer, int value)
    {
        Span<byte> four = stackalloc byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(four, value);
        buffer.AddRange(four);
    }
}
