namespace Connector.Storage.Disk;
