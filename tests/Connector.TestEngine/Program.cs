namespace Connector.TestEngine;

internal static class Program
{
    public static int Main() => 0;
}
