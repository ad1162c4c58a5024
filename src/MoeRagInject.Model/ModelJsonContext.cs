using System.Text.Json.Serialization;

namespace MoeRagInject.Model;

[JsonSerializable(typeof(string))]
internal sealed partial class ModelJsonContext : JsonSerializerContext;
