namespace MoeRagInject.Server.Requests;

/// <summary>A request the server answers with an error object; the middleware turns it into the response.</summary>
public sealed class ApiException : Exception
{
    public ApiException(int statusCode, string message, string type = "invalid_request_error")
        : base(message)
    {
        StatusCode = statusCode;
        Type = type;
    }

    public ApiException() : this(400, "bad request") { }

    public ApiException(string message) : this(400, message) { }

    public ApiException(string message, Exception innerException) : base(message, innerException)
    {
        StatusCode = 400;
        Type = "invalid_request_error";
    }

    public int StatusCode { get; }
    public string Type { get; }

    public static ApiException BadRequest(string message) => new(400, message);
}
