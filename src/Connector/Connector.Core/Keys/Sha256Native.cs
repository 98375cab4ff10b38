using System.Runtime.InteropServices;

namespace Connector.Core.Keys;

/// <summary>
/// SHA-256 of one small input through libcrypto's low-level SHA256_Init/Update/Final on a stack context:
/// the same SHA-NI code that .NET's SHA256 uses, without the EVP context set-up, locking and reset that
/// cost about 0.7 us per chunk through <see cref="System.Security.Cryptography.IncrementalHash"/>.
/// </summary>
/// <remarks>.NET's own cryptography on Linux requires OpenSSL's libcrypto, so it is always present;
/// <see cref="IsAvailable"/> guards the rare build without the low-level entry points.</remarks>
internal static unsafe partial class Sha256Native
{
    private const string LibCrypto = "libcrypto.so.3";

    /// <summary>sizeof(SHA256_CTX) is 112 bytes; 128 leaves room.</summary>
    private const int ContextBytes = 128;

    /// <summary>Whether the low-level functions could be bound (probed once).</summary>
    public static bool IsAvailable { get; } = Probe();

    /// <summary>Writes SHA-256(<paramref name="input"/>) into the 32 bytes of <paramref name="digest"/>.</summary>
    public static void Hash(ReadOnlySpan<byte> input, Span<byte> digest)
    {
        byte* ctx = stackalloc byte[ContextBytes];
        fixed (byte* data = input)
        fixed (byte* md = digest)
        {
            if (SHA256_Init(ctx) != 1 || SHA256_Update(ctx, data, (nuint)input.Length) != 1 || SHA256_Final(md, ctx) != 1)
            {
                throw new InvalidOperationException("libcrypto SHA256 failed");
            }
        }
    }

    private static bool Probe()
    {
        try
        {
            Span<byte> digest = stackalloc byte[32];
            Hash("abc"u8, digest);

            // FIPS 180-2 test vector for "abc".
            return Convert.ToHexStringLower(digest) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException or InvalidOperationException)
        {
            return false;
        }
    }

    [LibraryImport(LibCrypto)]
    private static partial int SHA256_Init(byte* ctx);

    [LibraryImport(LibCrypto)]
    private static partial int SHA256_Update(byte* ctx, byte* data, nuint length);

    [LibraryImport(LibCrypto)]
    private static partial int SHA256_Final(byte* md, byte* ctx);
}
