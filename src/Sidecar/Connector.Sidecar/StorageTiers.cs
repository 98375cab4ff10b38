using Connector.Core.Caching;
using Connector.Core.Storage.Tiers;
using Connector.Server;
using Connector.Storage.Disk;
using Connector.Storage.Redis;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Logging;

namespace Connector.Sidecar;

/// <summary>
/// Builds the tiers below L1 from the configuration, hot to cold: local disk (Sidecar:Disk, on when its Path is set),
/// then a Redis/Valkey pool (Sidecar:Redis, on when its Configuration is set). Each tier's settings are validated at
/// start; an invalid one stops the daemon with a message naming the setting.
/// </summary>
internal static class StorageTiers
{
    /// <summary>The chain of configured tiers (empty when none is configured).</summary>
    /// <exception cref="ArgumentException">A tier's settings are invalid.</exception>
    public static TierChain Create(IConfiguration configuration, SidecarOptions options, ILoggerFactory loggers)
    {
        var slots = new List<TierSlot>();
        IConfigurationSection disk = configuration.GetSection($"{SidecarOptions.Section}:Disk");
        if (!string.IsNullOrWhiteSpace(disk["Path"]))
        {
            var o = new DiskTierOptions();
            disk.Bind(o);
            o.Validate();
            slots.Add(new TierSlot(new DiskTier(o, loggers.CreateLogger("Connector.Storage.Disk")), Policy(options.DiskWritePolicy)));
        }

        IConfigurationSection redis = configuration.GetSection($"{SidecarOptions.Section}:Redis");
        if (!string.IsNullOrWhiteSpace(redis["Configuration"]))
        {
            var o = new RedisTierOptions();
            redis.Bind(o);
            o.Validate();
            slots.Add(new TierSlot(new RedisTier(o, loggers.CreateLogger("Connector.Storage.Redis")), Policy(options.RedisWritePolicy)));
        }

        return new TierChain(slots);
    }

    /// <summary>Promotion settings from the options.</summary>
    public static TieringOptions Tiering(SidecarOptions options) => new() { PromotionTimeout = options.PromotionTimeout, MaxPromotions = options.MaxPromotions };

    private static TierWritePolicy Policy(string value) => value == "write-through" ? TierWritePolicy.WriteThrough : TierWritePolicy.WriteBack;
}
