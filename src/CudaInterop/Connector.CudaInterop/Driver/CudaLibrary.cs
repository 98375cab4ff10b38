using System.Reflection;
using System.Runtime.InteropServices;

namespace Connector.CudaInterop.Driver;

/// <summary>
/// Where the driver library comes from: <c>libcuda.so.1</c> from the system by default, or another file
/// with the same entry points (the test double under tests/cuda_double) when a test or an operator names one.
/// </summary>
public static class CudaLibrary
{
    private static readonly Lock Gate = new();
    private static string? _path;
    private static bool _resolverSet;
    private static nint _handle;

    /// <summary>The library file in use, or null for the system's <c>libcuda.so.1</c>.</summary>
    public static string? Path => _path;

    /// <summary>
    /// Chooses the driver library, before the first driver call. Calling it again with the same path is harmless;
    /// a different path after the library was loaded is refused (a process has one driver).
    /// </summary>
    /// <param name="path">A path to a library with the driver's entry points, or null for <c>libcuda.so.1</c>.</param>
    /// <exception cref="InvalidOperationException">Another library is loaded already.</exception>
    public static void Use(string? path)
    {
        lock (Gate)
        {
            string? full = string.IsNullOrEmpty(path) ? null : System.IO.Path.GetFullPath(path);
            if (_handle != 0 && full != _path)
            {
                throw new InvalidOperationException($"the CUDA driver library {_path ?? CudaNative.Library} is loaded already; {full ?? CudaNative.Library} cannot replace it.");
            }

            _path = full;
            if (!_resolverSet)
            {
                NativeLibrary.SetDllImportResolver(typeof(CudaLibrary).Assembly, Resolve);
                _resolverSet = true;
            }
        }
    }

    /// <summary>Loads the chosen library.</summary>
    /// <param name="reason">Why it could not be loaded.</param>
    /// <returns>Whether it is loaded.</returns>
    public static bool TryLoad(out string? reason)
    {
        Use(_path);
        lock (Gate)
        {
            if (_handle != 0)
            {
                reason = null;
                return true;
            }

            string name = _path ?? CudaNative.Library;
            if (NativeLibrary.TryLoad(name, out _handle))
            {
                reason = null;
                return true;
            }

            reason = _path is null
                ? $"{CudaNative.Library} is not installed (no NVIDIA driver on this machine)"
                : $"the CUDA driver library {_path} cannot be loaded";
            return false;
        }
    }

    private static nint Resolve(string libraryName, Assembly assembly, DllImportSearchPath? searchPath)
    {
        if (libraryName != CudaNative.Library)
        {
            return 0;
        }

        return TryLoad(out _) ? _handle : 0;
    }
}
