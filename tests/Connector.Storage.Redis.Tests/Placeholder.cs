using Xunit;

namespace Connector.Storage.Redis.Tests;

public sealed class ProjectBuilds
{
    [Fact]
    public void TierAssemblyLoads() => Assert.NotNull(typeof(Connector.Core.Storage.Tiers.IChunkTier).Assembly);
}
