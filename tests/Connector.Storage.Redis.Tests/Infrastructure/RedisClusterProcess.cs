using System.Diagnostics;

namespace Connector.Storage.Redis.Tests.Infrastructure;

/// <summary>
/// A real Redis Cluster of redis-server processes on loopback, created with redis-cli --cluster create. Node timeout
/// is 1 s so a killed master fails over within seconds; replicas may always fail over (validity factor 0).
/// </summary>
internal sealed class RedisClusterProcess : IDisposable
{
    private RedisClusterProcess(IReadOnlyList<RedisServerProcess> nodes) => Nodes = nodes;

    public IReadOnlyList<RedisServerProcess> Nodes { get; }

    /// <summary>A StackExchange.Redis configuration naming every node.</summary>
    public string Configuration => string.Join(",", Nodes.Select(n => n.EndPoint));

    /// <summary>Starts <paramref name="masters"/> masters with <paramref name="replicasPerMaster"/> replicas each and waits until the cluster is ok.</summary>
    public static RedisClusterProcess Start(int masters, int replicasPerMaster)
    {
        var nodes = new List<RedisServerProcess>();
        try
        {
            for (int i = 0; i < masters * (1 + replicasPerMaster); i++)
            {
                nodes.Add(RedisServerProcess.Start(
                    clusterBus: true,
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", $"nodes-{i}.conf",
                    "--cluster-node-timeout", "1000",
                    "--cluster-replica-validity-factor", "0",
                    "--cluster-require-full-coverage", "no"));
            }

            RedisServerProcess.RunCli(["--cluster", "create", .. nodes.Select(n => n.EndPoint), "--cluster-replicas", replicasPerMaster.ToString(System.Globalization.CultureInfo.InvariantCulture), "--cluster-yes"]);
            var cluster = new RedisClusterProcess(nodes);
            cluster.WaitUntilOk(nodes, replicasPerMaster > 0);
            return cluster;
        }
        catch
        {
            foreach (RedisServerProcess n in nodes)
            {
                n.Dispose();
            }

            throw;
        }
    }

    /// <summary>The nodes that are masters now, by CLUSTER NODES as one running node sees it.</summary>
    public IReadOnlyList<RedisServerProcess> Masters()
    {
        RedisServerProcess any = Nodes.First(n => n.IsRunning);
        string nodes = any.Cli("cluster", "nodes");
        var masters = new List<RedisServerProcess>();
        foreach (string line in nodes.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            string[] f = line.Split(' ');
            if (f.Length > 2 && f[2].Contains("master", StringComparison.Ordinal) && !f[2].Contains("fail", StringComparison.Ordinal))
            {
                int port = int.Parse(f[1].Split('@')[0].Split(':')[1], System.Globalization.CultureInfo.InvariantCulture);
                masters.Add(Nodes.Single(n => n.Port == port));
            }
        }

        return masters;
    }

    /// <summary>Waits until every running node says cluster_state:ok and (with replicas) every replica is in sync.</summary>
    public void WaitUntilOk(IEnumerable<RedisServerProcess>? nodes = null, bool replicasInSync = false)
    {
        var deadline = Stopwatch.StartNew();
        foreach (RedisServerProcess node in (nodes ?? Nodes).Where(n => n.IsRunning))
        {
            while (!node.Cli("cluster", "info").Contains("cluster_state:ok", StringComparison.Ordinal)
                   || (replicasInSync && node.Cli("info", "replication") is { } r && r.Contains("role:slave", StringComparison.Ordinal) && !r.Contains("master_link_status:up", StringComparison.Ordinal)))
            {
                if (deadline.Elapsed > TimeSpan.FromSeconds(60))
                {
                    throw new TimeoutException($"cluster node {node.EndPoint} not ok within 60 s:\n{node.Cli("cluster", "info")}");
                }

                Thread.Sleep(50);
            }
        }
    }

    /// <summary>Waits until every replica of <paramref name="master"/> has acknowledged all of its writes.</summary>
    public static void WaitReplicated(RedisServerProcess master)
    {
        var deadline = Stopwatch.StartNew();
        while (true)
        {
            string info = master.Cli("info", "replication");
            long offset = 0;
            var replicaOffsets = new List<long>();
            foreach (string line in info.Split('\n', StringSplitOptions.TrimEntries))
            {
                if (line.StartsWith("master_repl_offset:", StringComparison.Ordinal))
                {
                    offset = long.Parse(line["master_repl_offset:".Length..], System.Globalization.CultureInfo.InvariantCulture);
                }
                else if (line.StartsWith("slave", StringComparison.Ordinal) && line.Contains("offset=", StringComparison.Ordinal))
                {
                    string field = line.Split(',').First(f => f.StartsWith("offset=", StringComparison.Ordinal));
                    replicaOffsets.Add(long.Parse(field["offset=".Length..], System.Globalization.CultureInfo.InvariantCulture));
                }
            }

            if (replicaOffsets.Count > 0 && replicaOffsets.All(o => o >= offset))
            {
                return;
            }

            if (deadline.Elapsed > TimeSpan.FromSeconds(60))
            {
                throw new TimeoutException($"the replicas of {master.EndPoint} did not catch up within 60 s:\n{info}");
            }

            Thread.Sleep(20);
        }
    }

    public void Dispose()
    {
        foreach (RedisServerProcess n in Nodes)
        {
            n.Dispose();
        }
    }
}
