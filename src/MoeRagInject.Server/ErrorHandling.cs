using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using MoeRagInject.Server.Contracts;
using MoeRagInject.Server.Requests;

namespace MoeRagInject.Server;

/// <summary>Turns exceptions into sglang's error object, so that one bad request never takes the server down.</summary>
internal static partial class ErrorHandling
{
    public static async Task Middleware(HttpContext context, RequestDelegate next)
    {
        try
        {
            await next(context).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (context.RequestAborted.IsCancellationRequested)
        {
            // The client left; there is no one to answer.
        }
        catch (Exception e) when (!context.Response.HasStarted)
        {
            var (status, type) = e switch
            {
                ApiException api => (api.StatusCode, api.Type),
                // The engine's contract: invalid requests (ids outside the vocabulary, too long) throw ArgumentException.
                ArgumentException => (StatusCodes.Status400BadRequest, "invalid_request_error"),
                BadHttpRequestException bad => (bad.StatusCode, "invalid_request_error"),
                _ => (StatusCodes.Status500InternalServerError, "internal_error"),
            };
            if (status >= 500 && e is not ApiException)
                LogUnhandled(Logger(context), context.Request.Method, context.Request.Path, e);
            await WriteAsync(context, status, e.Message, type).ConfigureAwait(false);
        }
    }

    public static Task WriteAsync(HttpContext context, int status, string message, string type)
    {
        context.Response.StatusCode = status;
        return context.Response.WriteAsJsonAsync(
            new ErrorResponse(new ErrorBody(message, type, status)), ApiJsonContext.Wire.ErrorResponse, contentType: null, context.RequestAborted);
    }

    public static ErrorResponse ToError(Exception e) => e switch
    {
        ApiException api => new ErrorResponse(new ErrorBody(api.Message, api.Type, api.StatusCode)),
        ArgumentException => new ErrorResponse(new ErrorBody(e.Message, "invalid_request_error", 400)),
        _ => new ErrorResponse(new ErrorBody(e.Message, "internal_error", 500)),
    };

    private static ILogger Logger(HttpContext context)
        => context.RequestServices.GetRequiredService<ILoggerFactory>().CreateLogger("MoeRagInject.Server");

    [LoggerMessage(Level = LogLevel.Error, Message = "{Method} {Path} failed")]
    public static partial void LogUnhandled(ILogger logger, string method, string path, Exception exception);
}
