namespace Connector.Storage.Redis;
