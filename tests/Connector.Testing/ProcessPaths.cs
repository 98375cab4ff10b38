namespace Connector.Testing;

/// <summary>Finds the built sidecar and test-engine programs.</summary>
public static class ProcessPaths
{
    /// <summary>The repository root (the folder holding Connector.sln).</summary>
    public static string RepoRoot { get; } = FindRoot();

#if DEBUG
    private const string Configuration = "Debug";
#else
    private const string Configuration = "Release";
#endif

    /// <summary>kvsidecar.dll: $KVSIDECAR_BIN when set (the published daemon), else the build output.</summary>
    public static string SidecarDll =>
        Environment.GetEnvironmentVariable("KVSIDECAR_BIN") is { Length: > 0 } bin && File.Exists(bin)
            ? bin
            : Existing(Path.Combine(RepoRoot, "src", "Sidecar", "Connector.Sidecar", "bin", Configuration, "net10.0", "kvsidecar.dll"));

    /// <summary>Connector.TestEngine.dll, the stand-in engine process that owns a KV pool.</summary>
    public static string TestEngineDll =>
        Existing(Path.Combine(RepoRoot, "tests", "Connector.TestEngine", "bin", Configuration, "net10.0", "Connector.TestEngine.dll"));

    private static string Existing(string path) =>
        File.Exists(path) ? path : throw new FileNotFoundException($"{path} is missing: build the solution first (dotnet build Connector.sln -c {Configuration}).", path);

    private static string FindRoot()
    {
        for (DirectoryInfo? d = new(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            if (File.Exists(Path.Combine(d.FullName, "Connector.sln")))
            {
                return d.FullName;
            }
        }

        throw new DirectoryNotFoundException("Connector.sln not found above " + AppContext.BaseDirectory);
    }
}
