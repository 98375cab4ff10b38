namespace Connector.Storage.Disk.Tests;

/// <summary>
/// The test executable's entry point: xunit's own (what its generated entry point does), except that
/// <c>--disk-writer</c> turns the process into the writer child of the crash test, which the test kills with SIGKILL.
/// </summary>
internal static class Program
{
    public static int Main(string[] args)
    {
        if (args.Length > 0 && args[0] == DiskWriterChild.Flag)
        {
            return DiskWriterChild.Run(args);
        }

        if (args.Any(arg => arg is "--server" or "--internal-msbuild-node"))
        {
            return Xunit.MicrosoftTestingPlatform.TestPlatformTestFramework.RunAsync(args, SelfRegisteredExtensions.AddSelfRegisteredExtensions).GetAwaiter().GetResult();
        }

        return Xunit.Runner.InProc.SystemConsole.ConsoleRunner.Run(args).GetAwaiter().GetResult();
    }
}
