using System.Text.Json.Nodes;

namespace MoeRagInject.Server.Contracts;

/// <summary>GET /rag_events: the last RAG events (RagEvent.ToJson()), newest first, and how many the server keeps.</summary>
public sealed record RagEventsResponse(IReadOnlyList<JsonObject> Events, int Capacity);
